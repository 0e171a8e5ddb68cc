"""Which entries an agent may receive: aliases, nesting, selectors, and index maintenance."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.authorized import EntryIndex, agent_selectors, diff
from controlplane.model import RegistrationEntry, Selector, agent_id, server_id
from spiffecore import SpiffeID, TrustDomain

TD = TrustDomain.parse("example.org")
SERVER = server_id(TD)
AGENT = agent_id(TD, "join_token", "t0ken0000000000000")
OTHER_AGENT = agent_id(TD, "x509pop", "abc")


def entry(entry_id: str, spiffe_id: str, parent: SpiffeID | str, *selectors: str) -> RegistrationEntry:
    return RegistrationEntry(
        id=entry_id,
        spiffe_id=SpiffeID.parse(spiffe_id),
        parent_id=parent if isinstance(parent, SpiffeID) else SpiffeID.parse(parent),
        selectors=tuple(Selector.parse(s) for s in (selectors or ("unix:uid:1000",))),
    )


NODE = entry("n1", "spiffe://example.org/node/a", SERVER, "x509pop:subject:cn:node-a")
ALIAS = entry("n2", "spiffe://example.org/node/token", SERVER, f"spiffe_id:{AGENT}")
WEB = entry("w1", "spiffe://example.org/web", "spiffe://example.org/node/a")
DIRECT = entry("w2", "spiffe://example.org/db", AGENT)
NESTED = entry("w3", "spiffe://example.org/web/child", "spiffe://example.org/web")
FOREIGN = entry("w4", "spiffe://example.org/other", OTHER_AGENT)
UNDER_ALIAS = entry("w5", "spiffe://example.org/api", "spiffe://example.org/node/token")
ALL = (NODE, ALIAS, WEB, DIRECT, NESTED, FOREIGN, UNDER_ALIAS)


def test_agent_gets_direct_children_aliases_and_their_descendants() -> None:
    index = EntryIndex(ALL)
    found = index.authorized(AGENT, [Selector.parse("x509pop:subject:cn:node-a")])
    assert sorted(found) == ["n1", "n2", "w1", "w2", "w3", "w5"]


def test_alias_needs_every_selector_of_the_node_entry() -> None:
    two = entry("n3", "spiffe://example.org/node/b", SERVER, "k8s_psat:cluster:c1", "k8s_psat:agent_ns:spire")
    child = entry("w6", "spiffe://example.org/b-child", "spiffe://example.org/node/b")
    index = EntryIndex([two, child])
    assert index.authorized(OTHER_AGENT, [Selector.parse("k8s_psat:cluster:c1")]) == {}
    both = [Selector.parse("k8s_psat:cluster:c1"), Selector.parse("k8s_psat:agent_ns:spire")]
    assert sorted(index.authorized(OTHER_AGENT, both)) == ["n3", "w6"]


def test_an_agent_never_gets_another_agents_entries() -> None:
    index = EntryIndex(ALL)
    assert "w4" not in index.authorized(AGENT, [])
    assert sorted(index.authorized(OTHER_AGENT, [])) == ["w4"]


def test_implicit_spiffe_id_selector() -> None:
    assert Selector(type="spiffe_id", value=str(AGENT)) in agent_selectors(AGENT, [])


def test_cycles_terminate() -> None:
    loop_a = entry("c1", "spiffe://example.org/a", "spiffe://example.org/b")
    loop_b = entry("c2", "spiffe://example.org/b", "spiffe://example.org/a")
    start = entry("c0", "spiffe://example.org/a", AGENT)
    assert sorted(EntryIndex([loop_a, loop_b, start]).authorized(AGENT, [])) == ["c0", "c1", "c2"]


def test_apply_keeps_the_index_current() -> None:
    index = EntryIndex(ALL)
    moved = entry("w1", "spiffe://example.org/web", OTHER_AGENT)
    index.apply([moved], ["w2"])
    found = index.authorized(AGENT, [Selector.parse("x509pop:subject:cn:node-a")])
    assert sorted(found) == ["n1", "n2", "w5"]
    assert sorted(index.authorized(OTHER_AGENT, [])) == ["w1", "w3", "w4"]
    assert index.get("w2") is None
    assert len(index) == len(ALL) - 1


def test_diff_reports_added_changed_and_removed() -> None:
    changed = RegistrationEntry(
        id="w1", spiffe_id=WEB.spiffe_id, parent_id=WEB.parent_id, selectors=WEB.selectors, revision=9
    )
    upserted, removed = diff({"w1": WEB, "w2": DIRECT}, {"w1": changed, "w3": NESTED})
    assert [e.id for e in upserted] == ["w1", "w3"]
    assert removed == ["w2"]
    assert diff({"w1": WEB}, {"w1": WEB}) == ([], [])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=30), st.data())
def test_incremental_index_equals_a_fresh_one(edges: list[tuple[int, int]], data: st.DataObject) -> None:
    """However entries are added and removed, the index answers as one built from scratch."""
    entries = [
        entry(f"e{i}", f"spiffe://example.org/p{child}", AGENT if parent == 0 else f"spiffe://example.org/p{parent}")
        for i, (parent, child) in enumerate(edges)
    ]
    index = EntryIndex()
    index.apply(entries, [])
    removed = data.draw(st.sets(st.sampled_from([e.id for e in entries]))) if entries else set()
    index.apply([], removed)
    fresh = EntryIndex(e for e in entries if e.id not in removed)
    assert index.authorized(AGENT, []) == fresh.authorized(AGENT, [])
