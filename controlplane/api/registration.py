"""The registration API: what ``spiffe-server entry|token|bundle|agent|federation ...`` talk to.

Served on a unix socket in a 0700 directory: whoever can reach the socket administers the trust
domain. Every store call runs in a worker thread; every write pokes the entry hub, so agents
connected to this server hear of the change at once (other servers hear of it through the
database's notifications). Federation relationships are checked against this server's trust
domain (a trust domain does not federate with itself) and the profile's rules; creating or
deleting one pokes the federation poller too, and refreshing one runs the poller's fetch now.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Final, Protocol, TypeVar

import grpc

from controlplane.api.convert import (
    agent_to_proto,
    bundle_to_proto,
    entry_from_proto,
    entry_to_proto,
    federation_from_proto,
    federation_to_proto,
    selector_from_proto,
    to_unix,
)
from controlplane.api.status import abort_with
from controlplane.attest.join_token import NAME as JOIN_TOKEN
from controlplane.federation.relationship import FederationStatus, parse_trust_domain
from controlplane.model import JoinToken, ModelError, RegistrationEntry, Selector, agent_id, parse_spiffe_id, server_id
from controlplane.store import Store
from spiffecore import SpiffeError, TrustDomain
from spiffeproto import registration_pb2, registration_pb2_grpc, types_pb2

DEFAULT_TOKEN_TTL: Final = timedelta(minutes=10)
MAX_TOKEN_TTL: Final = timedelta(days=30)
TOKEN_BYTES: Final = 24

Context = grpc.aio.ServicerContext[object, object]
T = TypeVar("T")


class FederationControl(Protocol):
    """The federation poller, as the registration API drives it."""

    def poke(self) -> None:
        """Relationships changed: re-read them now."""
        ...

    async def refresh(self, trust_domain: TrustDomain) -> FederationStatus:
        """Fetch the relationship's bundle now; the relationship as stored afterwards."""
        ...


class RegistrationService(registration_pb2_grpc.RegistrationAPIServicer):
    """The administrators' API over the store."""

    def __init__(
        self,
        *,
        store: Store,
        trust_domain: TrustDomain,
        clock: Callable[[], datetime],
        on_change: Callable[[], None],
        on_agent_change: Callable[[], None] | None = None,
        federation: FederationControl | None = None,
    ) -> None:
        self._store = store
        self._trust_domain = trust_domain
        self._clock = clock
        self._on_change = on_change
        # Evictions and bans change no entry; open watches must still hear of them to end.
        self._on_agent_change = on_agent_change or on_change
        self._federation = federation

    async def _run(self, context: Context, call: Callable[..., T], *args: object) -> T:
        """Run a store call in a thread; our errors end the RPC with their status."""
        try:
            return await asyncio.to_thread(call, *args)
        except SpiffeError as err:
            await abort_with(context, err)

    async def _entry(self, context: Context, message: types_pb2.Entry) -> RegistrationEntry:
        try:
            entry = entry_from_proto(message)
        except SpiffeError as err:
            await abort_with(context, err)
        if entry.spiffe_id.trust_domain != self._trust_domain:
            await abort_with(
                context,
                ModelError(f"entry SPIFFE ID must be in trust domain {self._trust_domain}", str(entry.spiffe_id)),
            )
        return entry

    async def CreateEntry(  # noqa: N802 - gRPC method names
        self, request: registration_pb2.CreateEntryRequest, context: Context
    ) -> types_pb2.Entry:
        entry = await self._entry(context, request.entry)
        created = await self._run(context, self._store.create_entry, entry)
        self._on_change()
        return entry_to_proto(created)

    async def UpdateEntry(  # noqa: N802
        self, request: registration_pb2.UpdateEntryRequest, context: Context
    ) -> types_pb2.Entry:
        if not request.entry.id:
            await abort_with(context, ModelError("entry id is required to update an entry"))
        entry = await self._entry(context, request.entry)
        updated = await self._run(context, self._store.update_entry, entry)
        self._on_change()
        return entry_to_proto(updated)

    async def DeleteEntry(  # noqa: N802
        self, request: registration_pb2.DeleteEntryRequest, context: Context
    ) -> types_pb2.Entry:
        deleted = await self._run(context, self._store.delete_entry, request.id)
        self._on_change()
        return entry_to_proto(deleted)

    async def GetEntry(  # noqa: N802
        self, request: registration_pb2.GetEntryRequest, context: Context
    ) -> types_pb2.Entry:
        return entry_to_proto(await self._run(context, self._store.get_entry, request.id))

    async def ListEntries(  # noqa: N802
        self, request: registration_pb2.ListEntriesRequest, context: Context
    ) -> AsyncIterator[types_pb2.Entry]:
        try:
            spiffe_id = parse_spiffe_id(request.spiffe_id, what="spiffe_id") if request.spiffe_id else None
            parent_id = parse_spiffe_id(request.parent_id, what="parent_id") if request.parent_id else None
            selector = selector_from_proto(request.selector) if request.HasField("selector") else None
        except SpiffeError as err:
            await abort_with(context, err)
        after = ""
        while True:
            page = await self._run(
                context,
                lambda after=after: self._store.list_entries(
                    spiffe_id=spiffe_id, parent_id=parent_id, selector=selector, after_id=after, limit=1000
                ),
            )
            for entry in page:
                yield entry_to_proto(entry)
            if len(page) < 1000:
                return
            after = page[-1].id

    async def CountEntries(  # noqa: N802
        self, request: registration_pb2.CountEntriesRequest, context: Context
    ) -> registration_pb2.CountEntriesResponse:
        return registration_pb2.CountEntriesResponse(count=await self._run(context, self._store.count_entries))

    async def CreateJoinToken(  # noqa: N802
        self, request: registration_pb2.CreateJoinTokenRequest, context: Context
    ) -> registration_pb2.CreateJoinTokenResponse:
        ttl = timedelta(seconds=request.ttl) if request.ttl else DEFAULT_TOKEN_TTL
        if not timedelta(seconds=1) <= ttl <= MAX_TOKEN_TTL:
            await abort_with(context, ModelError("join token TTL must be from 1 second to 30 days", request.ttl))
        # Hex, not urlsafe base64: a token that began with '-' read as a flag on a command line
        # (spiffe-agent run --join-token TOKEN failed once in 64 tokens).
        token = secrets.token_hex(TOKEN_BYTES)
        try:
            alias = parse_spiffe_id(request.alias, what="alias") if request.alias else None
            if alias is not None and alias.trust_domain != self._trust_domain:
                raise ModelError(f"join token alias must be in trust domain {self._trust_domain}", request.alias)
            join_token = JoinToken(token=token, expires_at=self._clock() + ttl, alias=alias)
            alias_entry = None
            if alias is not None:
                node_selector = Selector(type="spiffe_id", value=str(agent_id(self._trust_domain, JOIN_TOKEN, token)))
                alias_entry = RegistrationEntry(
                    spiffe_id=alias, parent_id=server_id(self._trust_domain), selectors=(node_selector,)
                )
        except SpiffeError as err:
            await abort_with(context, err)
        await self._run(context, self._store.create_join_token, join_token)
        if alias_entry is not None:
            await self._run(context, self._store.create_entry, alias_entry)
            self._on_change()
        return registration_pb2.CreateJoinTokenResponse(token=token, expires_at=to_unix(join_token.expires_at))

    async def GetBundle(  # noqa: N802
        self, request: registration_pb2.GetBundleRequest, context: Context
    ) -> types_pb2.Bundle:
        return bundle_to_proto(await self._run(context, self._store.get_bundle, self._trust_domain))

    async def ListAgents(  # noqa: N802
        self, request: registration_pb2.ListAgentsRequest, context: Context
    ) -> AsyncIterator[types_pb2.Agent]:
        for agent in await self._run(context, self._store.list_agents):
            yield agent_to_proto(agent)

    async def _agent_call(self, context: Context, call: Callable[..., T], text: str) -> T:
        try:
            spiffe_id = parse_spiffe_id(text, what="agent ID")
        except SpiffeError as err:
            await abort_with(context, err)
        return await self._run(context, call, spiffe_id)

    async def GetAgent(  # noqa: N802
        self, request: registration_pb2.AgentRequest, context: Context
    ) -> types_pb2.Agent:
        return agent_to_proto(await self._agent_call(context, self._store.get_agent, request.spiffe_id))

    async def EvictAgent(  # noqa: N802
        self, request: registration_pb2.AgentRequest, context: Context
    ) -> types_pb2.Agent:
        agent = await self._agent_call(context, self._store.evict_agent, request.spiffe_id)
        self._on_agent_change()
        return agent_to_proto(agent)

    async def BanAgent(  # noqa: N802
        self, request: registration_pb2.AgentRequest, context: Context
    ) -> types_pb2.Agent:
        agent = await self._agent_call(context, self._store.ban_agent, request.spiffe_id)
        self._on_agent_change()
        return agent_to_proto(agent)

    async def CreateFederationRelationship(  # noqa: N802
        self, request: registration_pb2.CreateFederationRelationshipRequest, context: Context
    ) -> types_pb2.FederationRelationship:
        try:
            relationship, bundle = federation_from_proto(request.relationship)
            relationship.check_for(self._trust_domain, bundle)
        except SpiffeError as err:
            await abort_with(context, err)
        created = await self._run(
            context, lambda: self._store.create_federation_relationship(relationship, bundle, at=self._clock())
        )
        self._federation_changed()
        return federation_to_proto(created)

    async def ListFederationRelationships(  # noqa: N802
        self, request: registration_pb2.ListFederationRelationshipsRequest, context: Context
    ) -> AsyncIterator[types_pb2.FederationRelationship]:
        for status in await self._run(context, self._store.list_federation_relationships):
            yield federation_to_proto(status)

    async def GetFederationRelationship(  # noqa: N802
        self, request: registration_pb2.FederationRelationshipRequest, context: Context
    ) -> types_pb2.FederationRelationship:
        trust_domain = await self._federated_domain(context, request.trust_domain)
        return federation_to_proto(await self._run(context, self._store.get_federation_relationship, trust_domain))

    async def DeleteFederationRelationship(  # noqa: N802
        self, request: registration_pb2.FederationRelationshipRequest, context: Context
    ) -> types_pb2.FederationRelationship:
        trust_domain = await self._federated_domain(context, request.trust_domain)
        deleted = await self._run(context, self._store.delete_federation_relationship, trust_domain)
        self._federation_changed()
        return federation_to_proto(deleted)

    async def RefreshFederatedBundle(  # noqa: N802
        self, request: registration_pb2.FederationRelationshipRequest, context: Context
    ) -> types_pb2.FederationRelationship:
        trust_domain = await self._federated_domain(context, request.trust_domain)
        if self._federation is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "federation: this server does not fetch bundles")
        try:
            refreshed = await self._federation.refresh(trust_domain)
        except SpiffeError as err:
            await abort_with(context, err)
        self._on_change()
        return federation_to_proto(refreshed)

    async def _federated_domain(self, context: Context, text: str) -> TrustDomain:
        try:
            return parse_trust_domain(text)
        except SpiffeError as err:
            await abort_with(context, err)

    def _federation_changed(self) -> None:
        self._on_change()
        if self._federation is not None:
            self._federation.poke()
