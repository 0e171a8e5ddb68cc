"""The node attestor interface and what an attestation yields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from controlplane.model import Selector
from spiffecore import SpiffeError, SpiffeID


class AttestationError(SpiffeError):
    """The agent's evidence was refused. The message says why, without quoting secrets."""

    layer = "attest"


class ChallengeChannel(Protocol):
    """The conversation with the agent while it attests: send a challenge, receive its answer."""

    async def challenge(self, challenge: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Attestation:
    """Who the agent is, as proven: its SPIFFE ID and the node selectors the attestor vouches for."""

    agent_id: SpiffeID
    selectors: tuple[Selector, ...] = ()
    can_reattest: bool = False


class NodeAttestor(Protocol):
    """Checks an agent's evidence, challenging it if the method needs to, and names the agent."""

    @property
    def name(self) -> str:
        """The attestation type agents ask for, such as ``join_token``."""
        ...

    async def attest(self, payload: bytes, channel: ChallengeChannel) -> Attestation:
        """Verify ``payload`` (and any challenge answers) or raise :class:`AttestationError`."""
        ...
