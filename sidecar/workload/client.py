"""Our Workload API client (grpc.aio), used by the agent CLI, the helper mode and the proxy.

``async with WorkloadAPIClient(address) as client:`` opens a channel to the endpoint (see
:mod:`sidecar.workload.endpoint` for the address rules) and every call carries the security header
``workload.spiffe.io: true``. One-shot fetches read the first message of a stream and close it;
``watch_*`` methods yield every message of a stream as spiffecore values. A stream that the server
ends, like any failed call, raises :class:`WorkloadAPIError` with the gRPC status code: clients
are expected to reconnect (:class:`sidecar.workload.source.X509Source` does, with backoff).
A malformed response is a :class:`WorkloadAPIError` with code ``INTERNAL`` naming what was wrong.

For a source that keeps the latest X.509 context::

    async with WorkloadAPIClient() as client, X509Source(client.watch_x509_context) as source:
        await source.ready()
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Final, Self, TypeVar

import grpc

from sidecar.workload import convert
from sidecar.workload.endpoint import resolve_endpoint
from sidecar.workload.identities import X509Context
from spiffecore import JWTSVID, JWTBundle, SpiffeError, SpiffeID, TrustDomain, X509Bundle
from spiffecore.errors import quote
from spiffeproto import workload_pb2, workload_pb2_grpc

HEADER: Final = (("workload.spiffe.io", "true"),)
DEFAULT_TIMEOUT: Final = 30.0
STREAM_ENDED: Final = "the Workload API ended the stream"
# gRPC's own reconnection backoff (1 s growing to 120 s by default) is aligned with the sources'
# 0.5 s to 30 s, so a restarted agent is reached again within the source's backoff.
CHANNEL_OPTIONS: Final = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 30_000),
)

T = TypeVar("T")
R = TypeVar("R")
V = TypeVar("V")


class WorkloadAPIError(SpiffeError):
    """A Workload API call failed: ``code`` is the gRPC status, ``message`` the reason."""

    layer = "workloadapi"

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        Exception.__init__(self, code, message)  # (code, message): what rebuilds it after pickle or copy
        self.code = code
        self.message = message
        self.rule = message
        self.value = None

    def __str__(self) -> str:
        return f"{self.layer}: {self.code.name}: {self.message}"


def _rpc_error(err: grpc.aio.AioRpcError) -> WorkloadAPIError:
    return WorkloadAPIError(err.code(), err.details() or "")


def _malformed(err: convert.MalformedResponseError) -> WorkloadAPIError:
    detail = str(err).removeprefix(f"{err.layer}: ")
    return WorkloadAPIError(grpc.StatusCode.INTERNAL, f"malformed response: {detail}")


async def _ended(call: grpc.aio.UnaryStreamCall[T, R]) -> WorkloadAPIError:
    """The error for a stream the server ended (with OK, or a status gRPC did not raise)."""
    code = await call.code()
    if code == grpc.StatusCode.OK:
        return WorkloadAPIError(grpc.StatusCode.UNAVAILABLE, STREAM_ENDED)
    return WorkloadAPIError(code, await call.details() or STREAM_ENDED)


def _now() -> datetime:
    return datetime.now(UTC)


class WorkloadAPIClient:
    """A client of the Workload API at ``address`` (else ``SPIFFE_ENDPOINT_SOCKET``, else the default).

    The address is checked at construction (:class:`~sidecar.workload.endpoint.EndpointError`); the
    channel is opened by ``async with`` and connects on the first call.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self._endpoint = resolve_endpoint(address, environ=environ)
        self._timeout = timeout
        self._clock = clock
        self._channel: grpc.aio.Channel | None = None
        self._stub: workload_pb2_grpc.SpiffeWorkloadAPIAsyncStub | None = None

    @property
    def target(self) -> str:
        """The gRPC target the client dials."""
        return self._endpoint.target

    async def __aenter__(self) -> Self:
        self._channel = grpc.aio.insecure_channel(self._endpoint.target, options=list(CHANNEL_OPTIONS))
        self._stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close(None)

    def _api(self) -> workload_pb2_grpc.SpiffeWorkloadAPIAsyncStub:
        if self._stub is None:
            raise RuntimeError("WorkloadAPIClient is not open: use it with 'async with'")
        return self._stub

    # --- X.509 ---------------------------------------------------------------------------------------

    async def fetch_x509_context(self) -> X509Context:
        """The caller's X.509-SVIDs (with keys; the first is the default) and bundles."""
        call = self._api().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=self._timeout)
        return await _first(call, convert.x509_context_from_response)

    def watch_x509_context(self) -> AsyncGenerator[X509Context, None]:
        """Every X.509 context the server sends, starting with the current one."""
        call = self._api().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
        return _each(call, convert.x509_context_from_response)

    async def fetch_x509_bundles(self) -> Mapping[TrustDomain, X509Bundle]:
        """The X.509 bundles the caller may see (own and federated)."""
        call = self._api().FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=self._timeout)
        return await _first(call, convert.x509_bundles_from_response)

    def watch_x509_bundles(self) -> AsyncGenerator[Mapping[TrustDomain, X509Bundle], None]:
        call = self._api().FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER)
        return _each(call, convert.x509_bundles_from_response)

    # --- JWT -------------------------------------------------------------------------------------------

    async def fetch_jwt_svids(
        self, audience: str | Iterable[str], spiffe_id: SpiffeID | None = None
    ) -> tuple[JWTSVID, ...]:
        """JWT-SVIDs for ``audience``: every identity of the caller's, or only ``spiffe_id``."""
        wanted = (audience,) if isinstance(audience, str) else tuple(audience)
        request = workload_pb2.JWTSVIDRequest(audience=wanted, spiffe_id=str(spiffe_id) if spiffe_id else "")
        try:
            response = await self._api().FetchJWTSVID(request, metadata=HEADER, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise _rpc_error(err) from err
        try:
            return convert.jwt_svids_from_response(response, wanted, at=self._clock())
        except convert.MalformedResponseError as err:
            raise _malformed(err) from err

    async def fetch_jwt_svid(self, audience: str | Iterable[str], spiffe_id: SpiffeID | None = None) -> JWTSVID:
        """The JWT-SVID of the default identity (the first), or of ``spiffe_id``."""
        return (await self.fetch_jwt_svids(audience, spiffe_id))[0]

    async def fetch_jwt_bundles(self) -> Mapping[TrustDomain, JWTBundle]:
        """The JWT bundles the caller may see (own and federated)."""
        call = self._api().FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER, timeout=self._timeout)
        return await _first(call, convert.jwt_bundles_from_response)

    def watch_jwt_bundles(self) -> AsyncGenerator[Mapping[TrustDomain, JWTBundle], None]:
        call = self._api().FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER)
        return _each(call, convert.jwt_bundles_from_response)

    async def validate_jwt_svid(self, token: str, audience: str) -> JWTSVID:
        """Have the agent validate ``token`` for ``audience``; the token, parsed, once it passed.

        The returned value is parsed locally from the token (its claims are the token's own); the
        agent's answer must name the same SPIFFE ID.
        """
        request = workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token)
        try:
            response = await self._api().ValidateJWTSVID(request, metadata=HEADER, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise _rpc_error(err) from err
        try:
            parsed = JWTSVID.parse_insecure(token, audience, at=self._clock())
        except SpiffeError as err:
            raise WorkloadAPIError(
                grpc.StatusCode.INTERNAL, f"the agent accepted a token this client cannot parse ({err})"
            ) from err
        if response.spiffe_id != str(parsed.id):
            raise WorkloadAPIError(
                grpc.StatusCode.INTERNAL,
                f"malformed response: spiffe_id does not match the token's subject ({parsed.id}): "
                f"{quote(response.spiffe_id)}",
            )
        return parsed


async def _first(call: grpc.aio.UnaryStreamCall[T, R], parse: Callable[[R], V]) -> V:
    """Parse the first message of a stream, then cancel the stream."""
    async with contextlib.aclosing(_each(call, parse)) as values:
        async for value in values:
            return value
    raise AssertionError("unreachable: _each raises when the stream ends without a message")


async def _each(call: grpc.aio.UnaryStreamCall[T, R], parse: Callable[[R], V]) -> AsyncGenerator[V, None]:
    """Parse every message of a stream; the stream is cancelled when the consumer stops."""
    try:
        async for response in call:
            yield parse(response)
        raise await _ended(call)
    except grpc.aio.AioRpcError as err:
        raise _rpc_error(err) from err
    except convert.MalformedResponseError as err:
        raise _malformed(err) from err
    finally:
        call.cancel()
