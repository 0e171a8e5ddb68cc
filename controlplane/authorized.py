"""Which registration entries an agent is authorized for. Pure: no I/O, no clock.

An agent may receive an entry when the entry's parent is the agent itself, one of the agent's
aliases, or the SPIFFE ID of another entry it may receive (nesting, as for downstream agents).
An alias is a node entry (parent = the server's ID) whose selectors are all among the agent's
selectors; every agent implicitly carries the selector ``spiffe_id:<its own ID>``, which is how a
join token's alias names exactly one agent.

:class:`EntryIndex` keeps every entry by ID, by parent and by kind, so the set authorized for an
agent is found by walking down from the agent (cost proportional to the answer, not to the store),
and :meth:`EntryIndex.apply` keeps it current from the store's change events.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Final

from controlplane.model import RegistrationEntry, Selector
from spiffecore import SpiffeID

SPIFFE_ID_SELECTOR: Final = "spiffe_id"


def agent_selectors(agent_id: SpiffeID, selectors: Iterable[Selector]) -> frozenset[Selector]:
    """An agent's node selectors plus the implicit ``spiffe_id:<agent ID>``."""
    return frozenset(selectors) | {Selector(type=SPIFFE_ID_SELECTOR, value=str(agent_id))}


class EntryIndex:
    """All registration entries, indexed for authorization queries."""

    def __init__(self, entries: Iterable[RegistrationEntry] = ()) -> None:
        self._by_id: dict[str, RegistrationEntry] = {}
        self._children: defaultdict[SpiffeID, set[str]] = defaultdict(set)
        self._node_entries: set[str] = set()
        for entry in entries:
            self._add(entry)

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, entry_id: str) -> RegistrationEntry | None:
        return self._by_id.get(entry_id)

    def apply(self, upserted: Iterable[RegistrationEntry], removed_ids: Iterable[str]) -> None:
        """Bring the index up to date with changed and deleted entries."""
        for entry_id in removed_ids:
            self._remove(entry_id)
        for entry in upserted:
            self._remove(entry.id)
            self._add(entry)

    def _add(self, entry: RegistrationEntry) -> None:
        self._by_id[entry.id] = entry
        self._children[entry.parent_id].add(entry.id)
        if entry.is_node_entry:
            self._node_entries.add(entry.id)

    def _remove(self, entry_id: str) -> None:
        entry = self._by_id.pop(entry_id, None)
        if entry is None:
            return
        siblings = self._children.get(entry.parent_id)
        if siblings is not None:
            siblings.discard(entry_id)
            if not siblings:
                del self._children[entry.parent_id]
        self._node_entries.discard(entry_id)

    def aliases(self, agent_id: SpiffeID, selectors: Iterable[Selector]) -> list[RegistrationEntry]:
        """The node entries whose selectors the agent satisfies."""
        held = agent_selectors(agent_id, selectors)
        return [
            entry
            for entry in (self._by_id[entry_id] for entry_id in self._node_entries)
            if held.issuperset(entry.selectors)
        ]

    def authorized(self, agent_id: SpiffeID, selectors: Iterable[Selector]) -> dict[str, RegistrationEntry]:
        """Every entry the agent may receive, by entry ID (its aliases included)."""
        found: dict[str, RegistrationEntry] = {}
        visited: set[SpiffeID] = set()
        frontier: list[SpiffeID] = [agent_id]
        for alias in self.aliases(agent_id, selectors):
            found[alias.id] = alias
            frontier.append(alias.spiffe_id)
        while frontier:
            parent = frontier.pop()
            if parent in visited:
                continue
            visited.add(parent)
            for entry_id in self._children.get(parent, ()):
                entry = self._by_id[entry_id]
                if entry_id not in found:
                    found[entry_id] = entry
                    frontier.append(entry.spiffe_id)
        return found


def diff(
    before: Mapping[str, RegistrationEntry], after: Mapping[str, RegistrationEntry]
) -> tuple[list[RegistrationEntry], list[str]]:
    """What changed between two authorized sets: entries added or changed, and IDs removed."""
    upserted = [entry for entry_id, entry in after.items() if before.get(entry_id) != entry]
    removed = [entry_id for entry_id in before if entry_id not in after]
    upserted.sort(key=lambda entry: entry.id)
    removed.sort()
    return upserted, removed
