"""``join_token``: the agent presents a single-use token an administrator generated.

The agent's ID is ``spiffe://<td>/spire/agent/join_token/<token>``, as in SPIRE. A token is
consumed atomically by the store, so it works once, on one server, even when several race.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Final, Protocol

from controlplane.attest.base import Attestation, AttestationError, ChallengeChannel
from controlplane.model import JoinToken, agent_id
from spiffecore import SpiffeError, TrustDomain

NAME: Final = "join_token"


class JoinTokens(Protocol):
    """Where tokens are consumed: the store."""

    def consume_join_token(self, token: str, now: datetime) -> JoinToken: ...


class JoinTokenAttestor:
    """Attests agents by join token."""

    name = NAME

    def __init__(self, *, trust_domain: TrustDomain, tokens: JoinTokens, clock: Callable[[], datetime]) -> None:
        self._trust_domain = trust_domain
        self._tokens = tokens
        self._clock = clock

    async def attest(self, payload: bytes, channel: ChallengeChannel) -> Attestation:
        try:
            token = payload.decode("ascii")
        except UnicodeDecodeError:
            raise AttestationError("join token is not ASCII") from None
        try:
            consumed = await asyncio.to_thread(self._tokens.consume_join_token, token, self._clock())
        except SpiffeError as err:
            raise AttestationError(f"join token refused ({err.rule})") from err
        return Attestation(agent_id=agent_id(self._trust_domain, NAME, consumed.token), can_reattest=False)
