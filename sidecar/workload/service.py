"""The SPIFFE Workload API server (SPIFFE_Workload_API.md, SPIFFE_Workload_Endpoint.md) on grpc.aio.

Every call goes through the same gate, in this order:

1. The security header ``workload.spiffe.io: true`` must be present exactly once with the value
   ``true`` (case-sensitive), else ``InvalidArgument`` (Workload Endpoint section 6: SSRF hardening).
2. The request's mandatory fields are checked (``InvalidArgument``), before any attestation work.
3. The caller is identified (``caller_of`` maps the gRPC peer to the process the agent's front door
   accepted) and attested once, at the start of the call. A call whose caller cannot be identified
   or attested fails with ``Unavailable``: Appendix A of the Workload Endpoint specification lists
   it as the code to retry with backoff, and the failure is transient from the workload's point of
   view (the front door had not yet registered the connection, or reading the process's attributes
   raced with the kernel). SPIRE answers an internal lookup failure with ``Internal`` and a caller
   that died during attestation with ``Unauthenticated``; neither is among the codes the
   specification defines for workloads to act on, and every client retries them anyway.
4. No registration entry applies to the caller's selectors: ``PermissionDenied`` ("no identity
   issued", SPIRE's words), which clients retry with backoff; a stream whose caller loses its last
   entry ends with the same status.

A stream keeps the selectors it was opened with: the caller is not re-attested when identities
change, as in SPIRE. A workload whose attributes change (a new image, another user) gets its new
identity on its next call; clients reconnect on every stream end, so closing streams is how the
agent would force re-attestation (for example after a cache flush). Re-attesting on every change
would cost one process inspection per open stream per rotation, for a case that needs a restart of
the workload anyway.

Streams send the full state at once and again after every change of the provider that changes what
this caller would be sent (the next message is built and compared with the last one sent; equal
messages are not sent). They end quietly when the client goes away (the handler is cancelled).

Every refusal is logged with its reason, the method and the caller's pid and uid; never a key or a
token (JWT validation errors never quote the token).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, NoReturn, TypeAlias, TypeVar, cast

import grpc
from google.protobuf.message import Message

from sidecar.agent.attestors.base import Caller, WorkloadAttestationError, WorkloadAttestor
from sidecar.workload import convert
from sidecar.workload.identities import IdentityProvider, X509Context
from spiffecore import JWTSVID, BundleNotFoundError, JWTBundle, JWTSVIDError, SpiffeError, SpiffeID, TrustDomain
from spiffecore.errors import quote
from spiffeproto import workload_pb2, workload_pb2_grpc

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
CallerOf: TypeAlias = Callable[[Context], Caller | None]
"""Maps a call's context (its gRPC peer) to the process that made it; ``None`` when unknown."""

RESPONSE_CACHE_SIZE: Final = 256
HEADER: Final = "workload.spiffe.io"
HEADER_VALUE: Final = "true"

HEADER_MISSING: Final = f'security header "{HEADER}: {HEADER_VALUE}" is missing from the request'
HEADER_REPEATED: Final = f'security header "{HEADER}" must be sent once'
HEADER_WRONG: Final = f'security header "{HEADER}" must be "{HEADER_VALUE}"'
NO_CALLER: Final = "could not identify the calling process"
ATTESTATION_FAILED: Final = "could not attest the calling process"
NO_IDENTITY: Final = "no identity issued"
NO_AUDIENCE: Final = "audience must be specified"
EMPTY_AUDIENCE: Final = "audience must not contain an empty string"
BAD_SPIFFE_ID: Final = "spiffe_id is not a valid SPIFFE ID"
NOT_CALLERS_ID: Final = "the caller has no identity"
NO_SVID: Final = "svid must be specified"
JWT_FETCH_FAILED: Final = "could not fetch JWT-SVIDs"

FOREIGN_CLAIMS: Final = ("sub", "aud", "exp")
"""The claims ValidateJWTSVID returns for a token of another trust domain (SPIRE does the same):
its other claims are that domain's business, and a local policy should not come to rely on them."""

_log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)


class _Pending:
    """The workload's state is not ready to send yet (its SVIDs are being signed)."""


PENDING: Final = _Pending()


@dataclass(frozen=True, slots=True, kw_only=True)
class _Call:
    """One admitted call: its method, the caller and the caller's selectors."""

    method: str
    caller: Caller | None
    selectors: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class _JWTBundles:
    """The JWT bundles a caller may see, as a JWTBundleSource: only these are used to validate."""

    bundles: Mapping[TrustDomain, JWTBundle]

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JWTBundle:
        bundle = self.bundles.get(trust_domain)
        if bundle is None:
            raise BundleNotFoundError("no JWT bundle for trust domain", trust_domain.name)
        return bundle


def _utc_now() -> datetime:
    return datetime.now(UTC)


class X509ResponseCache:
    """Built ``X509SVIDResponse`` messages, so the DER and PKCS#8 encoding of an identity happens
    once per change rather than once per stream.

    Cache rule: a response is a pure function of the :class:`X509Context` it was built from, whose
    parts (SVIDs, bundles) are immutable values. A held response is reused only for a context made
    of the very same SVID and bundle objects (identity, not equality), in the same order: the
    provider returns those until an SVID is renewed, dropped or re-labelled or a bundle changes, and
    then the response is built anew. The provider still decides every call (which entries apply,
    which SVIDs are unexpired) from the caller's own selectors; only the encoding is reused. Keys
    are those selectors; nothing of a caller's process or connection is kept. A held context keeps
    its objects alive, so their identities cannot pass to other objects meanwhile. At most
    ``max_size`` selector sets are held; the least recently used goes first.
    """

    def __init__(self, *, max_size: int = RESPONSE_CACHE_SIZE) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, not {max_size}")
        self._max_size = max_size
        self._held: dict[frozenset[str], tuple[X509Context, workload_pb2.X509SVIDResponse]] = {}
        self.built = 0
        """How many responses were built (not reused) so far."""

    def __len__(self) -> int:
        return len(self._held)

    def response(self, selectors: frozenset[str], context: X509Context) -> workload_pb2.X509SVIDResponse:
        held = self._held.pop(selectors, None)  # re-inserted last: the dict stays in LRU order
        if held is not None and _same_objects(held[0], context):
            self._held[selectors] = held
            return held[1]
        response = convert.x509_svid_response(context)
        self.built += 1
        while len(self._held) >= self._max_size:
            del self._held[next(iter(self._held))]
        self._held[selectors] = (context, response)
        return response


def _same_objects(a: X509Context, b: X509Context) -> bool:
    return (
        a.bundle is b.bundle
        and len(a.svids) == len(b.svids)
        and all(x is y for x, y in zip(a.svids, b.svids, strict=True))
        and len(a.federated) == len(b.federated)
        and all(b.federated.get(td) is bundle for td, bundle in a.federated.items())
    )


class WorkloadAPIService(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """The Workload API, served from an :class:`IdentityProvider` to attested callers."""

    def __init__(
        self,
        identities: IdentityProvider,
        caller_of: CallerOf,
        attestor: WorkloadAttestor,
        *,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._identities = identities
        self._caller_of = caller_of
        self._attestor = attestor
        self._clock = clock
        self._x509_responses = X509ResponseCache()

    # --- the five RPCs ---------------------------------------------------------------------------

    async def FetchX509SVID(  # noqa: N802 - gRPC method names
        self, request: workload_pb2.X509SVIDRequest, context: Context
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        call = await self._attest(context, await self._admit(context, "FetchX509SVID"))

        def build(selectors: frozenset[str]) -> workload_pb2.X509SVIDResponse | _Pending | None:
            x509_context = self._identities.x509_context(selectors)
            if x509_context is None:
                return None
            if not x509_context.svids:  # entries apply, their SVIDs are still being signed
                return PENDING
            return self._x509_responses.response(selectors, x509_context)

        async for response in self._stream(context, call, build):
            yield response

    async def FetchX509Bundles(  # noqa: N802
        self, request: workload_pb2.X509BundlesRequest, context: Context
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        call = await self._attest(context, await self._admit(context, "FetchX509Bundles"))

        def build(selectors: frozenset[str]) -> workload_pb2.X509BundlesResponse | None:
            bundles = self._identities.x509_bundles(selectors)
            return None if bundles is None else convert.x509_bundles_response(bundles)

        async for response in self._stream(context, call, build):
            yield response

    async def FetchJWTBundles(  # noqa: N802
        self, request: workload_pb2.JWTBundlesRequest, context: Context
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        call = await self._attest(context, await self._admit(context, "FetchJWTBundles"))

        def build(selectors: frozenset[str]) -> workload_pb2.JWTBundlesResponse | None:
            bundles = self._identities.jwt_bundles(selectors)
            return None if bundles is None else convert.jwt_bundles_response(bundles)

        async for response in self._stream(context, call, build):
            yield response

    async def FetchJWTSVID(  # noqa: N802
        self, request: workload_pb2.JWTSVIDRequest, context: Context
    ) -> workload_pb2.JWTSVIDResponse:
        call = await self._admit(context, "FetchJWTSVID")
        audience = tuple(request.audience)
        if not audience:
            await self._refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, NO_AUDIENCE)
        if not all(audience):
            await self._refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, EMPTY_AUDIENCE)
        spiffe_id: SpiffeID | None = None
        if request.spiffe_id:
            try:
                spiffe_id = SpiffeID.parse(request.spiffe_id)
            except SpiffeError as err:
                message = f"{BAD_SPIFFE_ID} ({err.rule}): {quote(request.spiffe_id)}"
                await self._refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, message)
        call = await self._attest(context, call)
        try:
            svids = await self._identities.jwt_svids(call.selectors, audience, spiffe_id)
        except SpiffeError as err:
            await self._refuse(context, call, grpc.StatusCode.UNAVAILABLE, f"{JWT_FETCH_FAILED} ({err})")
        if spiffe_id is not None:
            svids = [svid for svid in svids if svid.id == spiffe_id]
            if not svids:
                message = f"{NOT_CALLERS_ID} {quote(str(spiffe_id))}"
                await self._refuse(context, call, grpc.StatusCode.PERMISSION_DENIED, message)
        if not svids:
            await self._refuse(context, call, grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
        return convert.jwt_svid_response(svids)

    async def ValidateJWTSVID(  # noqa: N802
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: Context
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        call = await self._admit(context, "ValidateJWTSVID")
        if not request.audience:
            await self._refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, NO_AUDIENCE)
        if not request.svid:
            await self._refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, NO_SVID)
        call = await self._attest(context, call)
        bundles = self._identities.jwt_bundles(call.selectors)
        if bundles is None:
            await self._refuse(context, call, grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
        try:
            token = JWTSVID.parse_and_validate(request.svid, _JWTBundles(bundles), request.audience, at=self._clock())
        except JWTSVIDError as err:
            await self._refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        claims = dict(token.claims)
        claims["aud"] = list(token.audience)  # a single-string aud is returned as a list, as SPIRE does
        if token.id.trust_domain != self._identities.trust_domain:
            claims = {name: claims[name] for name in FOREIGN_CLAIMS if name in claims}
        return convert.validate_jwt_svid_response(token.id, claims)

    # --- the gate ----------------------------------------------------------------------------------

    async def _admit(self, context: Context, method: str) -> _Call:
        """Check the security header; the call, with its caller if known (for the logs so far)."""
        call = _Call(method=method, caller=self._caller_of(context))
        await self._check_header(context, call)
        return call

    async def _attest(self, context: Context, call: _Call) -> _Call:
        """Identify and attest the caller of an admitted call: the call with its selectors."""
        if call.caller is None:
            await self._refuse(context, call, grpc.StatusCode.UNAVAILABLE, NO_CALLER)
        try:
            selectors = await self._attestor.attest(call.caller)
        except WorkloadAttestationError as err:
            await self._refuse(context, call, grpc.StatusCode.UNAVAILABLE, f"{ATTESTATION_FAILED} ({err})")
        return _Call(method=call.method, caller=call.caller, selectors=frozenset(selectors))

    async def _check_header(self, context: Context, call: _Call) -> None:
        # grpc-stubs types this as aio.Metadata; grpcio returns a tuple of (key, value) pairs.
        pairs = cast(Iterable[tuple[str, str | bytes]], context.invocation_metadata() or ())
        values = [value for key, value in pairs if key == HEADER]
        if not values:
            await self._refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, HEADER_MISSING)
        if len(values) > 1:
            await self._refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, HEADER_REPEATED)
        if values[0] != HEADER_VALUE:
            message = f"{HEADER_WRONG}, not {quote(values[0])}"
            await self._refuse(context, call, grpc.StatusCode.INVALID_ARGUMENT, message)

    async def _refuse(self, context: Context, call: _Call, code: grpc.StatusCode, reason: str) -> NoReturn:
        caller = call.caller
        _log.warning(
            "workload API call refused",
            extra={
                "method": call.method,
                "code": code.name,
                "reason": reason,
                "caller_pid": caller.pid if caller is not None else None,
                "caller_uid": caller.uid if caller is not None else None,
            },
        )
        await context.abort(code, reason)
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises

    # --- streams -------------------------------------------------------------------------------------

    async def _stream(
        self, context: Context, call: _Call, build: Callable[[frozenset[str]], M | _Pending | None]
    ) -> AsyncIterator[M]:
        """The full state now, then again after every change that alters it; never a repeat.

        While ``build`` says the state is pending, nothing is sent: the stream waits for a change.
        """
        last: M | None = None
        while True:
            generation = self._identities.generation  # read first: a change while building is not missed
            response = build(call.selectors)
            if response is None:
                await self._refuse(context, call, grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
            if isinstance(response, _Pending):
                await self._identities.changed(generation)
                continue
            if response is not last and response != last:
                yield response
                last = response
            await self._identities.changed(generation)
