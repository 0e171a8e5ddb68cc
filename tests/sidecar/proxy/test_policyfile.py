"""The policy file parser: the rules of each listener and the default, addresses matched as
addresses, and every kind of mistake refused with the file, the line, the key and the input."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.proxy.address import Address
from sidecar.proxy.errors import ProxyConfigError
from sidecar.proxy.policy import Policy
from sidecar.proxy.policyfile import PolicyFileError, load_policy_file, parse_policy_file
from spiffecore import AuthorizationError, SpiffeID

FULL = """\
version: 1
listeners:
  - listen: 127.0.0.1:8443
    allow:
      ids: [spiffe://example.org/frontend, "spiffe://example.org/batch"]
      trust_domains: [partner.example, "spiffe://other.example"]
      patterns: ["spiffe://example.org/ns/*/sa/**"]
  - listen: "[::1]:9443"
    allow:
      any_id: true
  - listen: unix:/run/proxy.sock
    allow:
      ids: [spiffe://example.org/local]
default:
  allow:
    trust_domains: [example.org]
"""


def parse(text: str) -> Policy:
    return parse_policy_file(text, source="policy.yaml").for_listener(Address.parse("127.0.0.1:8443"))


def error(text: str) -> str:
    with pytest.raises(PolicyFileError) as info:
        parse(text)
    assert isinstance(info.value, ProxyConfigError)  # the CLI's exit code 2
    return str(info.value)


def test_each_listener_gets_its_own_rules_and_the_rest_the_default() -> None:
    policy_file = parse_policy_file(FULL, source="policy.yaml")
    assert policy_file.for_listener(Address.parse("127.0.0.1:8443")) == Policy.from_rules(
        allow_id=["spiffe://example.org/frontend", "spiffe://example.org/batch"],
        allow_trust_domain=["partner.example", "other.example"],
        allow_pattern=["spiffe://example.org/ns/*/sa/**"],
    )
    assert policy_file.for_listener(Address.parse("[::1]:9443")) == Policy.from_rules(allow_any_id=True)
    assert policy_file.for_listener(Address.parse("unix:/run/proxy.sock")) == Policy.from_rules(
        allow_id=["spiffe://example.org/local"]
    )
    assert policy_file.for_listener(Address.parse("127.0.0.1:8444")) == Policy.from_rules(
        allow_trust_domain=["example.org"]
    )


def test_the_rules_allow_and_refuse_as_the_flags_do() -> None:
    authorize = parse(FULL).authorizer()
    for allowed in ("spiffe://example.org/batch", "spiffe://partner.example/x", "spiffe://example.org/ns/a/sa/b/c"):
        authorize(SpiffeID.parse(allowed))
    for refused in ("spiffe://example.org/backend", "spiffe://example.org/ns/a/sa", "spiffe://third.example/x"):
        with pytest.raises(AuthorizationError):
            authorize(SpiffeID.parse(refused))


@pytest.mark.parametrize(
    ("named", "listen"),
    [
        ("[0:0::1]:8443", "[::1]:8443"),
        ("LocalHost:8443", "localhost:8443"),
        ("localhost.:8443", "localhost:8443"),
        ("127.0.0.1:8443", "127.0.0.1:8443"),
    ],
)
def test_listeners_are_matched_as_addresses(named: str, listen: str) -> None:
    text = f'version: 1\nlisteners:\n  - listen: "{named}"\n    allow: {{ids: [spiffe://a.org/x]}}\n'
    policy = parse_policy_file(text).for_listener(Address.parse(listen))
    assert policy == Policy.from_rules(allow_id=["spiffe://a.org/x"])


def test_no_rule_for_this_listener_without_a_default_is_an_error() -> None:
    text = "version: 1\nlisteners:\n  - listen: 127.0.0.1:9000\n    allow: {any_id: true}\n"
    assert error(text) == (
        "policy: policy.yaml: no rule for this proxy's listener (the file names 127.0.0.1:9000; "
        'add an entry for it, or a default): "127.0.0.1:8443"'
    )


LISTENER = "version: 1\nlisteners:\n  - listen: 127.0.0.1:8443\n    allow:\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", 'policy.yaml: missing required key "version"', id="empty file"),
        pytest.param(
            "version: 2\ndefault: {allow: {any_id: true}}\n",
            "policy.yaml:1: version: expected one of 1, got integer 2",
            id="unknown version",
        ),
        pytest.param(
            "version: '1'\ndefault: {allow: {any_id: true}}\n",
            'policy.yaml:1: version: expected one of 1, got string "1"',
            id="version as a string",
        ),
        pytest.param(
            "version: 1\n", "policy.yaml:1: the file has no rule: give listeners, a default, or both", id="no rule"
        ),
        pytest.param(
            "version: 1\nlistener:\n  - listen: 127.0.0.1:8443\n",
            'policy.yaml:2: unknown key "listener" (known: version, listeners, default)',
            id="unknown top-level key",
        ),
        pytest.param(
            "version: 1\nlisteners:\n  - listen: 127.0.0.1:8443\n    allow: {any_id: true}\n    deny: {}\n",
            'policy.yaml:5: unknown key "deny" in "listeners[0]" (known: listen, allow)',
            id="unknown listener key",
        ),
        pytest.param(
            LISTENER + "      idz: [spiffe://a.org/x]\n",
            'policy.yaml:5: unknown key "idz" in "listeners[0].allow" (known: ids, trust_domains, patterns, any_id)',
            id="unknown allow key",
        ),
        pytest.param(
            "version: 1\nlisteners:\n  - listen: 127.0.0.1:8443\n",
            'policy.yaml:3: missing required key "allow" in "listeners[0]"',
            id="no allow",
        ),
        pytest.param(
            "version: 1\nlisteners:\n  listen: 127.0.0.1:1\n",
            "policy.yaml:3: listeners: expected a list, got a mapping",
            id="listeners not a list",
        ),
        pytest.param(
            LISTENER + "      ids: spiffe://a.org/x\n",
            'policy.yaml:5: listeners[0].allow.ids: expected a list, got string "spiffe://a.org/x"',
            id="ids not a list",
        ),
        pytest.param(
            LISTENER + "      any_id: yes\n",
            'policy.yaml:5: listeners[0].allow.any_id: expected a boolean (true or false), got string "yes"',
            id="any_id not a boolean",
        ),
        pytest.param(
            "version: 1\nlisteners:\n  - listen: 8443\n    allow: {any_id: true}\n",
            "policy.yaml:3: listeners[0].listen: expected a string, got integer 8443",
            id="listen not a string",
        ),
        pytest.param(
            "version: 1\nlisteners:\n  - listen: nope\n    allow: {any_id: true}\n",
            'policy.yaml:3: listeners[0]: listen: address must be host:port, [v6]:port or unix:/path: "nope"',
            id="bad listen address",
        ),
        pytest.param(
            LISTENER + "      ids:\n        - spiffe://a.org/x\n        - http://a.org/y\n",
            'policy.yaml:5: listeners[0].allow: ids[1]: spiffeid: scheme is missing or invalid: "http://a.org/y"',
            id="bad ID",
        ),
        pytest.param(
            LISTENER + "      trust_domains: [Example.ORG]\n",
            "policy.yaml:5: listeners[0].allow: trust_domains[0]: spiffeid: trust domain characters are limited "
            'to lowercase letters, numbers, dots, dashes, and underscores: "Example.ORG"',
            id="bad trust domain",
        ),
        pytest.param(
            "version: 1\ndefault:\n  allow:\n    patterns: ['spiffe://a.org/**/x']\n",
            "policy.yaml:4: default.allow: patterns[0]: authorize: '**' may only be the last segment of an "
            'ID pattern: "spiffe://a.org/**/x"',
            id="bad pattern",
        ),
        pytest.param(
            "version: 1\nlisteners:\n  - listen: 127.0.0.1:8443\n    allow: {}\n",
            "policy.yaml:4: listeners[0].allow: allows nothing: give ids, trust_domains or patterns, or any_id: true",
            id="allows nothing",
        ),
        pytest.param(
            "version: 1\nlisteners:\n  - listen: 127.0.0.1:8443\n    allow:\n",
            "policy.yaml:4: listeners[0].allow: allows nothing: give ids, trust_domains or patterns, or any_id: true",
            id="allow left empty",
        ),
        pytest.param(
            LISTENER + "      any_id: false\n",
            "policy.yaml:5: listeners[0].allow: allows nothing: give ids, trust_domains or patterns, or any_id: true",
            id="any_id false alone",
        ),
        pytest.param(
            "version: 1\nlisteners:\n  - listen: 127.0.0.1:1\n    allow: {any_id: true, ids: [spiffe://a.org/x]}\n",
            "policy.yaml:4: listeners[0].allow: any_id: true cannot be combined with ids, trust_domains or patterns",
            id="any_id with rules",
        ),
        pytest.param(
            "version: 1\nlisteners:\n  - listen: 127.0.0.1:1\n    allow: {any_id: true}\n"
            '  - listen: "127.0.0.1:1"\n    allow: {any_id: true}\n',
            'policy.yaml:1: listeners[1].listen: "127.0.0.1:1" is the address of listeners[0] already: '
            "one entry per listener",
            id="a listener named twice",
        ),
        pytest.param(
            "version: 1\nversion: 1\n", 'policy.yaml:2: duplicate key "version" (first on line 1)', id="duplicate key"
        ),
        pytest.param("- version: 1\n", "policy.yaml:1: the top level must be a mapping, got a list", id="a list"),
        pytest.param(
            "version: 1\nlisteners: [\n",
            "policy.yaml:3: invalid YAML: expected the node content, but found '<stream end>'",
            id="broken YAML",
        ),
        pytest.param(
            "version: 1\n\tlisteners: []\n",
            "policy.yaml:2: invalid YAML: found character '\\t' that cannot start any token",
            id="a tab",
        ),
        pytest.param(
            "version: 1\n# \x1f\n",
            "policy.yaml:2: invalid YAML: special characters are not allowed (character #x001f)",
            id="a control character",
        ),
        pytest.param(
            "version: 1\nlisteners: " + "[" * 5000 + "]" * 5000 + "\n",
            "policy.yaml: invalid YAML: nested too deeply",
            id="nested too deeply",
        ),
    ],
)
def test_every_mistake_names_the_line_the_key_and_the_input(text: str, message: str) -> None:
    assert error(text) == "policy: " + message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "policy.yaml"
    with pytest.raises(PolicyFileError) as info:
        load_policy_file(missing)
    assert str(info.value) == f"policy: {missing}: no such file"


def test_the_file_is_read_from_disk_and_named_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(FULL)
    assert load_policy_file(path) == parse_policy_file(FULL, source=str(path))
    path.write_bytes(b"version: 1\n\xff\n")
    with pytest.raises(PolicyFileError) as info:
        load_policy_file(path)
    assert str(info.value).startswith(f"policy: {path}: not UTF-8 text")


_LABEL = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8)
_IDS = st.lists(st.builds("spiffe://{}.org/{}".format, _LABEL, _LABEL), max_size=4)
_DOMAINS = st.lists(st.builds("{}.example".format, _LABEL), max_size=3)
_PATTERNS = st.lists(st.builds("spiffe://{}.org/{}/*/**".format, _LABEL, _LABEL), max_size=3)


@settings(max_examples=60, deadline=None)
@given(ids=_IDS, domains=_DOMAINS, patterns=_PATTERNS, any_id=st.booleans())
def test_the_file_means_what_the_same_flags_mean(
    ids: list[str], domains: list[str], patterns: list[str], any_id: bool
) -> None:
    lines = ["version: 1", "default:", "  allow:"]
    lines += [f"    ids: [{', '.join(ids)}]", f"    trust_domains: [{', '.join(domains)}]"]
    lines += [f"    patterns: [{', '.join(repr(p) for p in patterns)}]", f"    any_id: {str(any_id).lower()}"]
    text = "\n".join(lines) + "\n"
    rules = bool(ids or domains or patterns)
    if rules != any_id:
        expected = Policy.from_rules(
            allow_id=ids, allow_trust_domain=domains, allow_pattern=patterns, allow_any_id=any_id
        )
        assert parse(text) == expected
    else:  # both, or neither: refused, as the flags refuse them
        with pytest.raises(PolicyFileError, match=r"policy\.yaml:4: default\.allow: (allows nothing|any_id: true)"):
            parse(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_a_policy_or_a_policy_file_error(text: str) -> None:
    try:
        parse(text)
    except PolicyFileError as err:
        message = str(err)
    else:
        return
    assert message.startswith("policy: policy.yaml")
