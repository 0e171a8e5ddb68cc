"""Workload attestors: what the agent learns of a calling process, as selectors.

Each attestor (``unix``, ``k8s``) yields the selectors of its own type; the agent runs those
enabled in its configuration as one :class:`CombinedAttestor`, whose selectors are the union of
theirs. An entry applies to a workload when all its selectors are among the workload's, so a
selector left out can only take identities away, never grant one.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.agent.attestors.base import Caller, WorkloadAttestor


class CombinedAttestor:
    """Several attestors as one: every one of them attests the caller, in order.

    A failure of any fails the attestation: the caller is not served on part of its selectors
    (which could select a different default identity than all of them would).
    """

    def __init__(self, attestors: Sequence[WorkloadAttestor]) -> None:
        if not attestors:
            raise ValueError("a combined attestor needs at least one attestor")
        self._attestors = tuple(attestors)

    @property
    def name(self) -> str:
        return "+".join(attestor.name for attestor in self._attestors)

    @property
    def attestors(self) -> tuple[WorkloadAttestor, ...]:
        return self._attestors

    async def attest(self, caller: Caller) -> frozenset[str]:
        """The union of every attestor's selectors, or the first one's :class:`WorkloadAttestationError`."""
        selectors: set[str] = set()
        for attestor in self._attestors:
            selectors |= await attestor.attest(caller)
        return frozenset(selectors)
