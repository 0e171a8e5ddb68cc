"""Envoy's Secret Discovery Service (SDS v3) on grpc.aio, on the agent's socket beside the Workload API.

Every call first identifies its caller the way the Workload API does (``caller_of`` maps the gRPC
peer to the process the front door accepted; the attestor gives its selectors), once per call: a
stream keeps the selectors it was opened with. Unlike the Workload API, no security header is
required: Envoy cannot send one, and neither SPIRE nor Istio asks for it on SDS.

``StreamSecrets`` (state of the world) and ``DeltaSecrets`` (incremental) feed each request to a
pure session (:mod:`sidecar.sds.session`) and send what it says. Each stream also waits for the
identity provider to change; after every change it rebuilds the secrets it serves and the session
sends those whose content differs (a rotation reaches Envoy at once). ``FetchSecrets`` answers once.

Errors, as one status per kind of failure (:data:`STATUS`). A name the caller may not have, or
that names nothing, ends the call with an error status, as SPIRE does, rather than leaving the
name out of the response: Envoy logs the status's message (``StreamSecrets gRPC config stream
closed: 7, sds: workload is not authorized ...``) and retries with backoff, whereas a missing
resource leaves the listener warming with no reason given anywhere. The message quotes only the
names the caller sent; nothing of another workload is built, let alone sent. The same happens to
an open stream whose caller loses an identity it subscribed to. A NACK is logged (warning) with
Envoy's reason, the node id and the versions; the stream stays at the client's last accepted
version and the rejected content is not sent again, only the next change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, NoReturn, Protocol, TypeAlias

import grpc
from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped]
from envoy.service.secret.v3 import sds_pb2_grpc  # type: ignore[import-untyped]
from google.protobuf import any_pb2
from google.protobuf.message import Message

from sidecar.agent.attestors.base import Caller, WorkloadAttestationError, WorkloadAttestor
from sidecar.sds.resources import (
    SECRET_TYPE_URL,
    BadResourceNameError,
    NodeInfo,
    NoIdentityError,
    NotAuthorizedError,
    Resolved,
    SDSConfig,
    SDSError,
    ValidatorRequiredError,
    node_info,
    resolve,
    spiffe_validator_enabled,
)
from sidecar.sds.session import (
    Acked,
    DeltaRequest,
    DeltaSession,
    DeltaSubscribed,
    Event,
    Nacked,
    ProtocolViolation,
    Rejection,
    SotwRequest,
    SotwSession,
    StaleNonce,
    Subscribed,
    content_version,
)
from sidecar.workload.identities import IdentityProvider
from spiffecore.errors import quote

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
CallerOf: TypeAlias = Callable[[Context], Caller | None]

NO_CALLER: Final = "sds: could not identify the calling process"
ATTESTATION_FAILED: Final = "sds: could not attest the calling process"
PENDING: Final = "sds: the workload's SVIDs are still being signed"

STATUS: Final[Mapping[type[SDSError], grpc.StatusCode]] = {
    NoIdentityError: grpc.StatusCode.PERMISSION_DENIED,
    NotAuthorizedError: grpc.StatusCode.PERMISSION_DENIED,
    BadResourceNameError: grpc.StatusCode.INVALID_ARGUMENT,
    ValidatorRequiredError: grpc.StatusCode.FAILED_PRECONDITION,
}

_log = logging.getLogger(__name__)


class _Node(Protocol):
    def HasField(self, name: str) -> bool: ...  # noqa: N802 - protobuf's name


class _Status(Protocol):
    code: int
    message: str


class _Request(Protocol):
    """The fields of ``DiscoveryRequest`` and ``DeltaDiscoveryRequest`` read here."""

    type_url: str
    response_nonce: str
    error_detail: _Status
    node: _Node

    def HasField(self, name: str) -> bool: ...  # noqa: N802


@dataclass(frozen=True, slots=True, kw_only=True)
class _Call:
    method: str
    caller: Caller | None
    selectors: frozenset[str] = frozenset()


def _rejection(request: _Request) -> Rejection | None:
    if not request.HasField("error_detail"):
        return None
    return Rejection(code=int(request.error_detail.code), message=str(request.error_detail.message))


def sotw_request(request: Any) -> SotwRequest:
    """A ``DiscoveryRequest`` as the session sees it."""
    return SotwRequest(
        names=tuple(str(name) for name in request.resource_names),
        version_info=str(request.version_info),
        nonce=str(request.response_nonce),
        error=_rejection(request),
    )


def delta_request(request: Any) -> DeltaRequest:
    """A ``DeltaDiscoveryRequest`` as the session sees it."""
    return DeltaRequest(
        subscribe=tuple(str(name) for name in request.resource_names_subscribe),
        unsubscribe=tuple(str(name) for name in request.resource_names_unsubscribe),
        initial_versions={str(k): str(v) for k, v in request.initial_resource_versions.items()},
        nonce=str(request.response_nonce),
        error=_rejection(request),
    )


def _packed(secret: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(secret)
    return packed


def discovery_response(resolved: Resolved, names: Iterable[str], version: str, nonce: str) -> Message:
    response: Message = discovery_pb2.DiscoveryResponse(
        version_info=version,
        resources=[_packed(resolved.secrets[name]) for name in names],
        type_url=SECRET_TYPE_URL,
        nonce=nonce,
    )
    return response


def delta_response(
    resolved: Resolved, updated: Mapping[str, str], removed: Iterable[str], system_version: str, nonce: str
) -> Message:
    response: Message = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=system_version,
        resources=[
            discovery_pb2.Resource(name=name, version=version, resource=_packed(resolved.secrets[name]))
            for name, version in updated.items()
        ],
        type_url=SECRET_TYPE_URL,
        removed_resources=list(removed),
        nonce=nonce,
    )
    return response


class _Changed:
    """The identity provider changed."""


class _End:
    """The client closed its side of the stream."""


_CHANGED: Final = _Changed()
_END: Final = _End()


class _Inbox:
    """The client's requests and the provider's changes, in arrival order, as one async iterator.

    Changes that arrive while one is still queued are merged into it: every rebuild reads the
    provider's current state.
    """

    def __init__(self, requests: AsyncIterable[Any], identities: IdentityProvider) -> None:
        self._requests = requests
        self._identities = identities
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._change_queued = False
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> _Inbox:
        seen = self._identities.generation  # read before any build: no change can be missed
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch(seen))]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _read(self) -> None:
        try:
            async for request in self._requests:
                self._queue.put_nowait(request)
        except grpc.aio.AioRpcError as err:  # pragma: no cover - the call was cancelled under us
            self._queue.put_nowait(err)
        self._queue.put_nowait(_END)

    async def _watch(self, seen: int) -> None:
        while True:
            seen = await self._identities.changed(seen)
            if not self._change_queued:
                self._change_queued = True
                self._queue.put_nowait(_CHANGED)

    def __aiter__(self) -> _Inbox:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _CHANGED:
            self._change_queued = False
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class SecretDiscoveryService(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """SDS v3 served from an :class:`IdentityProvider` to attested callers."""

    def __init__(
        self,
        identities: IdentityProvider,
        caller_of: CallerOf,
        attestor: WorkloadAttestor,
        *,
        config: SDSConfig | None = None,
    ) -> None:
        self._identities = identities
        self._caller_of = caller_of
        self._attestor = attestor
        self._config = config or SDSConfig()

    async def StreamSecrets(  # noqa: N802 - gRPC method names
        self, request_iterator: AsyncIterable[Any], context: Context
    ) -> AsyncIterator[Message]:
        call = await self._attest(context, "StreamSecrets")
        session = SotwSession(nonce_prefix=f"{secrets.token_hex(4)}-")
        node: NodeInfo | None = None
        async with _Inbox(request_iterator, self._identities) as inbox:
            async for item in inbox:
                if item is not _CHANGED:
                    await self._check_type(context, call, item)
                    if node is None and item.HasField("node"):
                        node = node_info(item.node)
                    self._log_events(call, node, session.receive(sotw_request(item)))
                if session.names is None:
                    continue
                resolved = await self._resolve(context, call, session.names, node)
                if resolved is None:
                    continue  # SVIDs are being signed: wait for the next change
                response = session.respond(resolved.versions)
                if response is not None:
                    yield discovery_response(resolved, response.names, response.version, response.nonce)

    async def DeltaSecrets(  # noqa: N802
        self, request_iterator: AsyncIterable[Any], context: Context
    ) -> AsyncIterator[Message]:
        call = await self._attest(context, "DeltaSecrets")
        session = DeltaSession(nonce_prefix=f"{secrets.token_hex(4)}-")
        node: NodeInfo | None = None
        async with _Inbox(request_iterator, self._identities) as inbox:
            async for item in inbox:
                if item is not _CHANGED:
                    await self._check_type(context, call, item)
                    if node is None and item.HasField("node"):
                        node = node_info(item.node)
                    try:
                        events = session.receive(delta_request(item))
                    except ProtocolViolation as err:
                        await self._refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, str(err))
                    self._log_events(call, node, events)
                if not session.started:
                    continue
                resolved = await self._delta_resources(context, call, session, node)
                if resolved is None:
                    continue
                response = session.respond(resolved.versions)
                if response is not None:
                    yield delta_response(
                        resolved, response.updated, response.removed, response.system_version, response.nonce
                    )

    async def FetchSecrets(  # noqa: N802
        self, request: Any, context: Context
    ) -> Message:
        call = await self._attest(context, "FetchSecrets")
        await self._check_type(context, call, request)
        node = node_info(request.node) if request.HasField("node") else None
        names = tuple(str(name) for name in request.resource_names)
        resolved = await self._resolve(context, call, names, node)
        if resolved is None:
            await self._refuse(context, call, grpc.StatusCode.UNAVAILABLE, PENDING)
        return discovery_response(resolved, resolved.secrets, content_version(resolved.versions), "")

    # --- helpers ---------------------------------------------------------------------------------------

    async def _delta_resources(
        self, context: Context, call: _Call, session: DeltaSession, node: NodeInfo | None
    ) -> Resolved | None:
        parts: list[Resolved] = []
        if session.wildcard:
            everything = await self._resolve(context, call, (), node)
            if everything is None:
                return None
            parts.append(everything)
        if session.names:
            named = await self._resolve(context, call, session.names, node)
            if named is None:
                return None
            parts.append(named)
        secrets_: dict[str, Message] = {}
        versions: dict[str, str] = {}
        for part in parts:
            secrets_.update(part.secrets)
            versions.update(part.versions)
        return Resolved(secrets=secrets_, versions=versions)

    async def _resolve(
        self, context: Context, call: _Call, names: Iterable[str], node: NodeInfo | None
    ) -> Resolved | None:
        spiffe_validator = spiffe_validator_enabled(self._config, node or NodeInfo())
        try:
            return resolve(
                names, self._identities.x509_context(call.selectors), self._config, spiffe_validator=spiffe_validator
            )
        except SDSError as err:
            await self._refuse(context, call, STATUS[type(err)], str(err), node)

    async def _check_type(self, context: Context, call: _Call, request: _Request) -> None:
        if request.type_url and request.type_url != SECRET_TYPE_URL:
            message = f"sds: type_url must be {SECRET_TYPE_URL}, not {quote(request.type_url)}"
            await self._refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, message)

    async def _attest(self, context: Context, method: str) -> _Call:
        call = _Call(method=method, caller=self._caller_of(context))
        if call.caller is None:
            await self._refuse(context, call, grpc.StatusCode.UNAVAILABLE, NO_CALLER)
        try:
            selectors = await self._attestor.attest(call.caller)
        except WorkloadAttestationError as err:
            await self._refuse(context, call, grpc.StatusCode.UNAVAILABLE, f"{ATTESTATION_FAILED} ({err})")
        return _Call(method=method, caller=call.caller, selectors=frozenset(selectors))

    def _log_events(self, call: _Call, node: NodeInfo | None, events: Iterable[Event]) -> None:
        for event in events:
            fields = _fields(call, node)
            if isinstance(event, Nacked):
                _log.warning(
                    "sds: envoy rejected secrets",
                    extra={
                        **fields,
                        "rejected_version": event.version,
                        "kept_version": event.kept_version,
                        "reason": event.rejection.message,
                        "reason_code": event.rejection.code,
                    },
                )
            elif isinstance(event, Acked):
                _log.debug("sds: envoy accepted secrets", extra={**fields, "version": event.version})
            elif isinstance(event, Subscribed | DeltaSubscribed):
                _log.debug("sds: subscription", extra={**fields, "subscription": repr(event)})
            elif isinstance(event, StaleNonce):
                _log.debug("sds: stale nonce ignored", extra={**fields, "nonce": event.nonce})

    async def _refuse(
        self,
        context: Context,
        call: _Call,
        code: grpc.StatusCode,
        reason: str,
        node: NodeInfo | None = None,
    ) -> NoReturn:
        _log.warning("sds call refused", extra={**_fields(call, node), "code": code.name, "reason": reason})
        await context.abort(code, reason)
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def _fields(call: _Call, node: NodeInfo | None) -> dict[str, object]:
    return {
        "method": call.method,
        "node_id": node.id if node is not None else None,
        "caller_pid": call.caller.pid if call.caller is not None else None,
        "caller_uid": call.caller.uid if call.caller is not None else None,
    }


def add_to_server(service: SecretDiscoveryService, server: grpc.aio.Server) -> None:
    """Register ``service`` on ``server`` (keeps the generated module out of composition roots)."""
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(service, server)
