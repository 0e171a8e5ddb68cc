"""The agent's cache and federated bundles: each workload sees only those its own entries federate with.

Pure: no sockets. Bundles come from test CAs; the watch events are built as the server sends them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sidecar.agent.cache import AgentCache, CacheError
from sidecar.agent.serverapi import Entry, FederatedBundlesUpdate, JWTSVIDGrant, SnapshotPage
from sidecar.sds.resources import NotAuthorizedError, SDSConfig, resolve
from spiffecore import SpiffeBundle, SpiffeID, TrustDomain
from tests.support.ca import TestCA

TD = "spiffe://example.org"
AGENT = SpiffeID.parse(f"{TD}/spire/agent/join_token/abc")
T0 = datetime(2030, 1, 1, tzinfo=UTC)
CA = TestCA.create("example.org", not_before=T0 - timedelta(days=1), not_after=T0 + timedelta(days=30))
OTHER = TrustDomain.parse("other.org")
THIRD = TrustDomain.parse("third.org")
OTHER_BUNDLE = TestCA.create("other.org").bundle()
THIRD_BUNDLE = TestCA.create("third.org").bundle()


async def no_jwt(entry_id: str, audience: tuple[str, ...]) -> JWTSVIDGrant:
    raise AssertionError("no JWT-SVID expected")


def entry(entry_id: str, path: str, selector: str, *federates_with: TrustDomain) -> Entry:
    return Entry(
        id=entry_id,
        spiffe_id=SpiffeID.parse(f"{TD}{path}"),
        parent_id=AGENT,
        selectors=(selector,),
        federates_with=federates_with,
    )


def update(*bundles: SpiffeBundle) -> FederatedBundlesUpdate:
    return FederatedBundlesUpdate(bundles={bundle.trust_domain: bundle for bundle in bundles})


@pytest.fixture
def cache() -> AgentCache:
    made = AgentCache(agent_id=AGENT, bundle=CA.bundle(), jwt_fetch=no_jwt, clock=lambda: T0)
    entries = (
        entry("a", "/frontend", "unix:uid:1", OTHER),
        entry("b", "/batch", "unix:uid:2", OTHER, THIRD),
        entry("c", "/local", "unix:uid:3"),
    )
    made.apply(SnapshotPage(entries=entries, last=True, revision=1))
    for item in entries:
        made.store([(item, CA.mint(item.spiffe_id.path, not_before=T0, not_after=T0 + timedelta(hours=1)).svid())])
    return made


def test_each_workload_sees_the_federated_bundles_of_its_own_entries(cache: AgentCache) -> None:
    assert cache.apply(update(OTHER_BUNDLE, THIRD_BUNDLE))

    frontend = cache.x509_context(frozenset({"unix:uid:1"}))
    assert frontend is not None
    assert dict(frontend.federated) == {OTHER: OTHER_BUNDLE.x509}
    batch = cache.x509_bundles(frozenset({"unix:uid:2"}))
    assert batch is not None
    assert dict(batch) == {CA.trust_domain: CA.bundle().x509, OTHER: OTHER_BUNDLE.x509, THIRD: THIRD_BUNDLE.x509}
    jwt = cache.jwt_bundles(frozenset({"unix:uid:2"}))
    assert jwt is not None
    assert jwt[THIRD] == THIRD_BUNDLE.jwt
    local = cache.x509_context(frozenset({"unix:uid:3"}))
    assert local is not None
    assert dict(local.federated) == {}


def test_sds_all_holds_the_callers_federated_bundles(cache: AgentCache) -> None:
    cache.apply(update(OTHER_BUNDLE, THIRD_BUNDLE))
    context = cache.x509_context(frozenset({"unix:uid:1"}))
    resolved = resolve(["ALL", "spiffe://other.org"], context, SDSConfig(), spiffe_validator=True)
    assert resolved is not None
    validator = resolved.secrets["ALL"].validation_context.custom_validator_config  # type: ignore[attr-defined]
    assert validator.name == "envoy.tls.cert_validator.spiffe"
    with pytest.raises(NotAuthorizedError, match="not authorized for the requested resources"):
        resolve(["spiffe://third.org"], context, SDSConfig(), spiffe_validator=True)


def test_a_set_without_a_domain_removes_it_and_an_unchanged_bundle_keeps_its_object(cache: AgentCache) -> None:
    cache.apply(update(OTHER_BUNDLE, THIRD_BUNDLE))
    held = cache.federated[OTHER]
    generation = cache.generation

    assert not cache.apply(update(SpiffeBundle.parse(OTHER, OTHER_BUNDLE.to_json()), THIRD_BUNDLE))
    assert cache.federated[OTHER] is held
    assert cache.generation == generation

    assert cache.apply(update(THIRD_BUNDLE))
    assert cache.generation > generation
    frontend = cache.x509_context(frozenset({"unix:uid:1"}))
    assert frontend is not None
    assert dict(frontend.federated) == {}


def test_a_bundle_of_the_agents_own_domain_is_refused_as_federated(cache: AgentCache) -> None:
    with pytest.raises(CacheError, match=r"a federated bundle must be of a trust domain other than example\.org"):
        cache.apply(update(CA.bundle()))
    mislabelled = FederatedBundlesUpdate(bundles={THIRD: OTHER_BUNDLE})
    with pytest.raises(CacheError):
        cache.apply(mislabelled)
    assert dict(cache.federated) == {}
