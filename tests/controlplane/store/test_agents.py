"""Attested agents: upsert, read, serial renewal, ban and eviction."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta

import pytest

from controlplane.model import Selector
from controlplane.store import NotFoundError, Store
from tests.controlplane.store.support import AGENT, NOW, OTHER_AGENT, make_agent


def test_upsert_then_get(store: Store) -> None:
    agent = make_agent(can_reattest=True)

    store.upsert_agent(agent)

    assert store.get_agent(AGENT) == agent


def test_upsert_replaces_the_stored_agent(store: Store) -> None:
    store.upsert_agent(make_agent())
    replaced = make_agent(serial="99", selectors=(Selector.parse("k8s:node:n1"), Selector.parse("k8s:ns:a")))

    store.upsert_agent(replaced)

    assert store.get_agent(AGENT) == replaced
    assert store.list_agents() == [replaced]


def test_list_agents_in_id_order(store: Store) -> None:
    second, first = make_agent(OTHER_AGENT), make_agent(AGENT)
    store.upsert_agent(second)
    store.upsert_agent(first)

    assert store.list_agents() == [first, second]


def test_set_agent_serial(store: Store) -> None:
    store.upsert_agent(make_agent())
    expires = NOW + timedelta(hours=2)

    renewed = store.set_agent_serial(AGENT, "5678", expires)

    assert renewed == make_agent(serial="5678", expires_at=expires)
    assert store.get_agent(AGENT) == renewed


def test_ban_marks_the_agent_and_clears_its_serial(store: Store) -> None:
    store.upsert_agent(make_agent())

    banned = store.ban_agent(AGENT)

    assert banned == dataclasses.replace(make_agent(), banned=True, serial="")
    assert store.get_agent(AGENT) == banned


def test_evict_deletes_the_agent(store: Store) -> None:
    store.upsert_agent(make_agent())

    assert store.evict_agent(AGENT) == make_agent()

    with pytest.raises(NotFoundError):
        store.get_agent(AGENT)
    assert store.list_agents() == []


OPERATIONS: dict[str, Callable[[Store], object]] = {
    "get": lambda store: store.get_agent(AGENT),
    "serial": lambda store: store.set_agent_serial(AGENT, "1", NOW),
    "ban": lambda store: store.ban_agent(AGENT),
    "evict": lambda store: store.evict_agent(AGENT),
}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_unknown_agent_is_not_found(store: Store, operation: str) -> None:
    with pytest.raises(NotFoundError) as caught:
        OPERATIONS[operation](store)

    assert str(caught.value) == 'store: no agent with this ID: "spiffe://example.org/spire/agent/join_token/agent-1"'
