from __future__ import annotations

import pytest

from sidecar.proxy.errors import ProxyConfigError
from sidecar.proxy.policy import NO_RULE, Policy
from spiffecore import AuthorizationError, AuthorizeAny, SpiffeID


def test_no_rule_fails_closed() -> None:
    with pytest.raises(ProxyConfigError) as info:
        Policy().authorizer()
    assert str(info.value) == f"proxy: {NO_RULE}"


def test_any_id_must_be_alone() -> None:
    assert Policy.from_rules(allow_any_id=True).authorizer() == AuthorizeAny()
    with pytest.raises(ProxyConfigError, match="cannot be combined"):
        Policy.from_rules(allow_any_id=True, allow_id=["spiffe://a.org/x"])


def test_rules_are_ored() -> None:
    authorize = Policy.from_rules(
        allow_id=["spiffe://a.org/web"],
        allow_trust_domain=["spiffe://b.org"],
        allow_pattern=["spiffe://c.org/ns/*/sa/**"],
    ).authorizer()
    for allowed in ("spiffe://a.org/web", "spiffe://b.org/anything/at/all", "spiffe://c.org/ns/prod/sa/x/y"):
        authorize(SpiffeID.parse(allowed))
    for refused in (
        "spiffe://a.org/web2",
        "spiffe://c.org/ns/prod/sa",
        "spiffe://c.org/ns/a/b/sa/x",
        "spiffe://d.org/web",
    ):
        with pytest.raises(AuthorizationError) as info:
            authorize(SpiffeID.parse(refused))
        assert str(info.value).startswith(f'authorize: "{refused}" is not allowed: want ')


@pytest.mark.parametrize(
    ("rules", "fragment"),
    [
        ({"allow_id": ["http://a.org/x"]}, "bad allow rule (spiffeid:"),
        ({"allow_trust_domain": ["A.org"]}, "bad allow rule (spiffeid:"),
        ({"allow_pattern": ["spiffe://a.org/**/x"]}, "'**' may only be the last segment"),
    ],
)
def test_bad_rules_are_refused_with_the_input(rules: dict[str, list[str]], fragment: str) -> None:
    with pytest.raises(ProxyConfigError) as info:
        Policy.from_rules(**rules)  # type: ignore[arg-type]
    assert fragment in str(info.value)
