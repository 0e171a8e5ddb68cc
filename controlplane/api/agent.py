"""The agent API: attestation, agent SVID renewal, the entry watch, and SVID signing for agents.

Every RPC but ``AttestAgent`` authenticates the agent by its TLS client certificate chain, which
is verified here against the trust domain's current bundle (the handshake also accepts the public
attestation client certificate, so it proves nothing by itself): the chain must be an X509-SVID
of an agent ID in this trust domain, of an agent the store knows, that is not banned, and its
leaf must be the agent's newest SVID (its serial). An agent can only ever obtain SVIDs for the
entries authorized for it, whatever it asks for: the entry, not the CSR, decides the SPIFFE ID.

The watch also carries the bundles of federated trust domains, but only those that some entry
authorized for the agent federates with (the agent hands each workload only its own entries'
ones): the whole set first, before the snapshot, then again whenever it changes, before the
entry deltas that may have changed it, so a workload never sees an entry's new federation before
the bundle it needs.

``BatchNewX509SVID`` is the hot path: each item costs a CSR self-signature check and a signing,
about the same each. cryptography releases the GIL while it verifies but holds it while it
signs, so the checks of a batch go to a small thread pool up front and each item is signed on
the calling thread as soon as its own check is done: later items are checked while earlier ones
are signed, on another core when one is free. One batch signs at a time, and the CA's rotation
check runs once per batch, not once per SVID.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from datetime import datetime, timedelta
from typing import Final, NoReturn, Protocol, TypeVar

import grpc
from cryptography import x509

from controlplane.api.convert import bundle_to_proto, entry_to_proto, to_unix, x509_svid_to_proto
from controlplane.api.hub import EntryHub
from controlplane.api.status import abort_with
from controlplane.attest.base import Attestation, AttestationError, NodeAttestor
from controlplane.authorized import diff
from controlplane.model import AttestedAgent, ModelError, RegistrationEntry, is_agent_id
from controlplane.store import Store
from controlplane.store.errors import NotFoundError
from spiffecore import SpiffeBundle, SpiffeError, SpiffeID, TrustDomain, verify_x509_svid
from spiffeproto import agent_pb2, agent_pb2_grpc, types_pb2

MAX_BATCH: Final = 1000
MAX_AUDIENCES: Final = 32
DEFAULT_PAGE: Final = 1000
MAX_PAGE: Final = 10_000
FIRST_MESSAGE_TIMEOUT: Final = 30.0
# Attestation metrics are labelled by attestation type; a type no enabled attestor has (or none
# yet, when the first message is malformed) is counted under this one name, so a caller cannot
# create label values at will.
UNKNOWN_ATTESTATION_TYPE: Final = "unknown"
ATTESTATION_SUCCESS: Final = "success"
ATTESTATION_REFUSED: Final = "refused"

# A wire contract shared with the agent (sidecar.agent.serverapi holds the same bytes). gRPC's
# Python server cannot ask for a client certificate optionally: it asks for none, or requires one.
# The agent API requires one, so an agent that has no SVID yet calls AttestAgent with this
# certificate. Its private key is public on purpose: it identifies nobody, and no RPC but
# AttestAgent (which needs no identity) accepts it, because _authenticate verifies every chain
# against the trust bundle itself.
ATTESTATION_CLIENT_CERT_PEM: Final = b"""\
-----BEGIN CERTIFICATE-----
MIIBuDCCAV6gAwIBAgIBATAKBggqhkjOPQQDAjBJMUcwRQYDVQQDDD5zcGlmZmUt
c2lkZWNhciBhdHRlc3RhdGlvbiBjbGllbnQgKHB1YmxpYyBrZXksIHByb3ZlcyBu
b3RoaW5nKTAgFw0yNTAxMDEwMDAwMDBaGA85OTk5MTIzMTIzNTk1OVowSTFHMEUG
A1UEAww+c3BpZmZlLXNpZGVjYXIgYXR0ZXN0YXRpb24gY2xpZW50IChwdWJsaWMg
a2V5LCBwcm92ZXMgbm90aGluZykwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATi
IIFXIVD1dZHphoP4p4JzZFRR0LWRYQPz0cJ7fhsZFWeyBGckAAcl4vtnUNSvcuA8
b8hRSWkFxoqJx4ti3hYeozUwMzAMBgNVHRMBAf8EAjAAMA4GA1UdDwEB/wQEAwIH
gDATBgNVHSUEDDAKBggrBgEFBQcDAjAKBggqhkjOPQQDAgNIADBFAiBNh7rZaOQb
ea26W1FAa8MSVd1Yb4yVuE4pEAFgCvlZRgIhAIOYqoZvetVKWjKerTn62AeuZZc6
12E1j6Gs5Y9Lz5u7
-----END CERTIFICATE-----
"""

Context = grpc.aio.ServicerContext[object, object]
T = TypeVar("T")


class X509Issuer(Protocol):
    """Signs X.509-SVIDs with the authority, and at the time, that one rotation check settled on."""

    def __call__(
        self, spiffe_id: SpiffeID, public_key: object, *, dns_names: tuple[str, ...], ttl: timedelta | None
    ) -> tuple[x509.Certificate, ...]: ...


class Signer(Protocol):
    """What the agent API needs of the CA."""

    def public_key_from_csr(self, csr_der: bytes) -> object:
        """The CSR's public key once its self-signature is checked. Safe to call from several threads."""
        ...

    def x509_svid(
        self, spiffe_id: SpiffeID, public_key: object, *, dns_names: tuple[str, ...], ttl: timedelta | None
    ) -> tuple[x509.Certificate, ...]:
        """One X.509-SVID: any due rotation step first, then the signing."""
        ...

    def x509_issuer(self) -> X509Issuer:
        """Any due rotation step, once for a whole batch; the issuer signs with the authority active now."""
        ...

    def jwt_svid(
        self, spiffe_id: SpiffeID, audience: tuple[str, ...], *, ttl: timedelta | None
    ) -> tuple[str, datetime]:
        """A JWT-SVID and its expiry."""
        ...


class AgentMetrics(Protocol):
    """What the agent API reports (the composition root backs it with Prometheus)."""

    def attestation(self, attestation_type: str, result: str) -> None:
        """An AttestAgent call ended: ``result`` is :data:`ATTESTATION_SUCCESS` or :data:`ATTESTATION_REFUSED`."""
        ...

    def watch_opened(self) -> None: ...

    def watch_closed(self) -> None: ...


class NoMetrics:
    """Reports nothing."""

    def attestation(self, attestation_type: str, result: str) -> None:
        pass

    def watch_opened(self) -> None:
        pass

    def watch_closed(self) -> None:
        pass


class AuthError(SpiffeError):
    """The caller is not an agent that may use the agent API. The message says why."""

    layer = "agent-api"


class _Channel:
    """The attestation conversation over the AttestAgent stream."""

    def __init__(self, context: Context) -> None:
        self._context = context

    async def challenge(self, challenge: bytes) -> bytes:
        await self._context.write(agent_pb2.AttestAgentResponse(challenge=challenge))
        message = await self._context.read()
        if not isinstance(message, agent_pb2.AttestAgentRequest) or message.WhichOneof("step") != "challenge_response":
            raise AttestationError("expected a challenge response")
        return message.challenge_response


class AgentService(agent_pb2_grpc.AgentAPIServicer):
    """The agent API over the store, the entry hub and the CA."""

    def __init__(
        self,
        *,
        store: Store,
        hub: EntryHub,
        signer: Signer,
        attestors: Mapping[str, NodeAttestor],
        trust_domain: TrustDomain,
        clock: Callable[[], datetime],
        agent_svid_ttl: timedelta,
        csr_checks: Executor | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        """``csr_checks`` runs the CSR checks of signing batches (a thread pool: see the module's
        docstring); without one they run on the signing thread. The caller owns and shuts it down.
        """
        self._store = store
        self._hub = hub
        self._signer = signer
        self._attestors = attestors
        self._trust_domain = trust_domain
        self._clock = clock
        self._agent_svid_ttl = agent_svid_ttl
        self._csr_checks = csr_checks
        self._signing = threading.Lock()
        self._metrics = metrics if metrics is not None else NoMetrics()
        self._authorized: dict[tuple[SpiffeID, tuple[object, ...]], tuple[int, dict[str, RegistrationEntry]]] = {}

    async def _run(self, context: Context, call: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.to_thread(call, *args)
        except SpiffeError as err:
            await abort_with(context, err)

    async def _authenticate(self, context: Context) -> AttestedAgent:
        auth = context.auth_context()
        leaf_pems = auth.get("x509_pem_cert")
        if not leaf_pems:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "agent-api: an agent X.509-SVID is required as the client certificate"
            )
        try:
            chain = _peer_chain(next(iter(leaf_pems)), auth.get("x509_pem_cert_chain", ()))
            assert self._hub.bundle is not None, "the hub is loaded before the API serves"
            verified = verify_x509_svid(chain, self._hub.bundle, at=self._clock())
        except (ValueError, SpiffeError) as err:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"agent-api: client certificate is not an X.509-SVID of this trust domain ({err})",
            )
        spiffe_id = verified.id
        if not is_agent_id(spiffe_id):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f'agent-api: caller is not an agent of this trust domain: "{spiffe_id}"',
            )
        agent = await self._current_agent(context, spiffe_id)
        if agent.serial != f"{chain[0].serial_number:x}":
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f'agent-api: this agent SVID was superseded by a newer one: "{spiffe_id}"',
            )
        return agent

    async def _current_agent(self, context: Context, spiffe_id: SpiffeID) -> AttestedAgent:
        try:
            agent = await asyncio.to_thread(self._store.get_agent, spiffe_id)
        except NotFoundError:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f'agent-api: agent is not attested (or was evicted): "{spiffe_id}"'
            )
        except SpiffeError as err:
            await abort_with(context, err)
        if agent.banned:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f'agent-api: agent is banned: "{spiffe_id}"')
        return agent

    def _authorized_for(self, agent: AttestedAgent) -> dict[str, RegistrationEntry]:
        """The entries ``agent`` may have, computed once per hub generation."""
        key = (agent.spiffe_id, tuple(agent.selectors))
        generation = self._hub.generation
        cached = self._authorized.get(key)
        if cached is not None and cached[0] == generation:
            return cached[1]
        found = self._hub.index.authorized(agent.spiffe_id, agent.selectors)
        if len(self._authorized) > 10_000:
            self._authorized.clear()
        self._authorized[key] = (generation, found)
        return found

    def _federated_for(self, entries: Mapping[str, RegistrationEntry]) -> dict[TrustDomain, SpiffeBundle]:
        """The federated bundles the server has of the trust domains that ``entries`` federate with."""
        available = self._hub.federated
        if not available:
            return {}
        wanted = {td for entry in entries.values() for td in entry.federates_with}
        return {td: available[td] for td in sorted(wanted) if td in available}

    def _bundle(self) -> types_pb2.Bundle:
        assert self._hub.bundle is not None, "the hub is loaded before the API serves"
        return bundle_to_proto(self._hub.bundle)

    def _sign_agent_svid(self, spiffe_id: SpiffeID, csr: bytes) -> tuple[x509.Certificate, ...]:
        public_key = self._signer.public_key_from_csr(csr)
        return self._signer.x509_svid(spiffe_id, public_key, dns_names=(), ttl=self._agent_svid_ttl)

    # The challenge conversation needs the read/write style of a stream handler rather than a
    # generator (an attestor awaits the agent's answer mid-way), which the generated stub's
    # iterator-returning signature does not express.
    async def AttestAgent(self, request_iterator: object, context: Context) -> None:  # type: ignore[override]  # noqa: N802
        try:
            first = await asyncio.wait_for(context.read(), FIRST_MESSAGE_TIMEOUT)
        except TimeoutError:
            self._metrics.attestation(UNKNOWN_ATTESTATION_TYPE, ATTESTATION_REFUSED)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "agent-api: no attestation parameters received")
        if not isinstance(first, agent_pb2.AttestAgentRequest) or first.WhichOneof("step") != "params":
            await self._refuse(
                context,
                UNKNOWN_ATTESTATION_TYPE,
                ModelError("the first AttestAgent message must carry the attestation parameters"),
            )
        params = first.params
        attestor = self._attestors.get(params.type)
        if attestor is None:
            await self._refuse(
                context,
                UNKNOWN_ATTESTATION_TYPE,
                ModelError(
                    f"attestation type is unknown or not enabled (enabled: {', '.join(sorted(self._attestors))})",
                    params.type,
                ),
            )
        try:
            attestation: Attestation = await attestor.attest(params.payload, _Channel(context))
        except SpiffeError as err:
            await self._refuse(context, attestor.name, err)
        existing = await self._existing_agent(context, attestation.agent_id)
        if existing is not None and existing.banned:
            self._metrics.attestation(attestor.name, ATTESTATION_REFUSED)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f'agent-api: agent is banned: "{attestation.agent_id}"'
            )
        try:
            chain = await asyncio.to_thread(self._sign_agent_svid, attestation.agent_id, params.csr)
        except SpiffeError as err:
            await self._refuse(context, attestor.name, err)
        agent = AttestedAgent(
            spiffe_id=attestation.agent_id,
            attestation_type=attestor.name,
            serial=f"{chain[0].serial_number:x}",
            expires_at=chain[0].not_valid_after_utc,
            selectors=attestation.selectors,
            can_reattest=attestation.can_reattest,
        )
        await self._run(context, self._store.upsert_agent, agent)
        result = agent_pb2.AttestationResult(
            svid=x509_svid_to_proto(str(agent.spiffe_id), chain), bundle=self._bundle(), can_reattest=agent.can_reattest
        )
        await context.write(agent_pb2.AttestAgentResponse(result=result))
        self._metrics.attestation(attestor.name, ATTESTATION_SUCCESS)

    async def _refuse(self, context: Context, attestation_type: str, err: SpiffeError) -> NoReturn:
        """Count a refused attestation, then end the call with ``err``'s status."""
        self._metrics.attestation(attestation_type, ATTESTATION_REFUSED)
        await abort_with(context, err)

    async def _existing_agent(self, context: Context, spiffe_id: SpiffeID) -> AttestedAgent | None:
        try:
            return await asyncio.to_thread(self._store.get_agent, spiffe_id)
        except NotFoundError:
            return None
        except SpiffeError as err:
            await abort_with(context, err)

    async def RenewAgent(  # noqa: N802
        self, request: agent_pb2.RenewAgentRequest, context: Context
    ) -> agent_pb2.RenewAgentResponse:
        agent = await self._authenticate(context)
        chain = await self._run(context, self._sign_agent_svid, agent.spiffe_id, request.csr)
        await self._run(
            context,
            self._store.set_agent_serial,
            agent.spiffe_id,
            f"{chain[0].serial_number:x}",
            chain[0].not_valid_after_utc,
        )
        return agent_pb2.RenewAgentResponse(svid=x509_svid_to_proto(str(agent.spiffe_id), chain))

    async def WatchEntries(  # noqa: N802
        self, request: agent_pb2.WatchEntriesRequest, context: Context
    ) -> AsyncIterator[agent_pb2.WatchEntriesResponse]:
        agent = await self._authenticate(context)
        page_size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        self._metrics.watch_opened()
        try:
            async with contextlib.aclosing(self._watch(agent, page_size, context)) as responses:
                async for response in responses:
                    yield response
        finally:
            self._metrics.watch_closed()

    async def _watch(
        self, agent: AttestedAgent, page_size: int, context: Context
    ) -> AsyncGenerator[agent_pb2.WatchEntriesResponse, None]:
        """The bundle, the federated bundles, the snapshot pages; then what changed, when it concerns ``agent``."""
        generation = self._hub.generation
        sent_bundle = self._hub.bundle
        yield agent_pb2.WatchEntriesResponse(bundle=self._bundle())
        current = self._authorized_for(agent)
        sent_federated = self._federated_for(current)
        yield _federated_message(sent_federated)
        ordered = sorted(current.values(), key=lambda entry: entry.id)
        revision = self._hub.revision
        for start in range(0, max(len(ordered), 1), page_size):
            page = ordered[start : start + page_size]
            last = start + page_size >= len(ordered)
            snapshot = agent_pb2.SnapshotPage(entries=[entry_to_proto(e) for e in page], last=last, revision=revision)
            yield agent_pb2.WatchEntriesResponse(snapshot=snapshot)
        while True:
            generation = await self._hub.changed(generation)
            if self._hub.closing:
                return  # the server is stopping; the agent reconnects to it or another server
            agent = await self._current_agent(context, agent.spiffe_id)
            if self._hub.bundle is not sent_bundle:
                sent_bundle = self._hub.bundle
                yield agent_pb2.WatchEntriesResponse(bundle=self._bundle())
            latest = self._authorized_for(agent)
            upserted, removed = diff(current, latest)
            current = latest
            federated = self._federated_for(current)
            if federated.keys() != sent_federated.keys() or any(
                federated[td] is not sent_federated[td] for td in federated
            ):
                sent_federated = federated
                yield _federated_message(federated)
            for start in range(0, max(len(upserted), len(removed)), page_size):
                deltas = agent_pb2.EntryDeltas(
                    upserted=[entry_to_proto(e) for e in upserted[start : start + page_size]],
                    removed_ids=removed[start : start + page_size],
                    revision=self._hub.revision,
                )
                yield agent_pb2.WatchEntriesResponse(deltas=deltas)

    async def BatchNewX509SVID(  # noqa: N802
        self, request: agent_pb2.BatchNewX509SVIDRequest, context: Context
    ) -> agent_pb2.BatchNewX509SVIDResponse:
        agent = await self._authenticate(context)
        if len(request.params) > MAX_BATCH:
            await abort_with(context, ModelError(f"a batch holds at most {MAX_BATCH} CSRs", len(request.params)))
        authorized = self._authorized_for(agent)
        results = await asyncio.to_thread(self._sign_batch, authorized, list(request.params))
        return agent_pb2.BatchNewX509SVIDResponse(results=results)

    def _sign_batch(
        self, authorized: Mapping[str, RegistrationEntry], params: Sequence[agent_pb2.NewX509SVIDParams]
    ) -> list[agent_pb2.X509SVIDResult]:
        """One result per item, in order: the SVID, or why not (the entry is not authorized, the CSR is bad).

        With a pool, the CSR checks of the authorized items are submitted first, and each item is
        signed when its own check is done while the pool checks the items after it. One batch
        signs at a time: signing holds the GIL, so batches signing side by side would only take
        turns at it, and the switching costs more than the waiting (measured: 4 batches in
        flight signed a quarter to a third fewer SVIDs per second than 1 at a time).
        """
        entries = [authorized.get(item.entry_id) for item in params]
        csrs = [item.csr for item, entry in zip(params, entries, strict=True) if entry is not None]
        futures = [] if self._csr_checks is None else [self._csr_checks.submit(self._check_csr, csr) for csr in csrs]
        checks: Iterator[Callable[[], object]] = (
            iter([future.result for future in futures])
            if futures
            else (functools.partial(self._check_csr, csr) for csr in csrs)
        )
        try:
            with self._signing:
                issue = self._signer.x509_issuer()
                return [
                    self._sign_item(issue, item, entry, checks) if entry is not None else _not_authorized(item)
                    for item, entry in zip(params, entries, strict=True)
                ]
        finally:
            for future in futures:  # those still queued, if the batch ended early
                future.cancel()

    def _check_csr(self, csr: bytes) -> object:
        return self._signer.public_key_from_csr(csr)

    @staticmethod
    def _sign_item(
        issue: X509Issuer,
        item: agent_pb2.NewX509SVIDParams,
        entry: RegistrationEntry,
        checks: Iterator[Callable[[], object]],
    ) -> agent_pb2.X509SVIDResult:
        try:
            public_key = next(checks)()
            ttl = timedelta(seconds=entry.x509_svid_ttl) if entry.x509_svid_ttl else None
            chain = issue(entry.spiffe_id, public_key, dns_names=entry.dns_names, ttl=ttl)
        except SpiffeError as err:
            code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            return agent_pb2.X509SVIDResult(error_code=code, error_message=str(err))
        return agent_pb2.X509SVIDResult(svid=x509_svid_to_proto(str(entry.spiffe_id), chain))

    async def NewJWTSVID(  # noqa: N802
        self, request: agent_pb2.NewJWTSVIDRequest, context: Context
    ) -> agent_pb2.NewJWTSVIDResponse:
        agent = await self._authenticate(context)
        entry = self._authorized_for(agent).get(request.entry_id)
        if entry is None:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f'agent-api: entry is not authorized for this agent: "{request.entry_id}"',
            )
        audience = tuple(request.audience)
        if not audience or len(audience) > MAX_AUDIENCES or not all(audience):
            await abort_with(context, ModelError(f"a JWT-SVID needs 1 to {MAX_AUDIENCES} non-empty audiences"))
        ttl = timedelta(seconds=entry.jwt_svid_ttl) if entry.jwt_svid_ttl else None
        token, expires_at = await self._run(context, lambda: self._signer.jwt_svid(entry.spiffe_id, audience, ttl=ttl))
        return agent_pb2.NewJWTSVIDResponse(spiffe_id=str(entry.spiffe_id), token=token, expires_at=to_unix(expires_at))

    async def GetBundle(  # noqa: N802
        self, request: agent_pb2.GetBundleRequest, context: Context
    ) -> agent_pb2.GetBundleResponse:
        await self._authenticate(context)
        return agent_pb2.GetBundleResponse(bundle=self._bundle())


def _federated_message(bundles: Mapping[TrustDomain, SpiffeBundle]) -> agent_pb2.WatchEntriesResponse:
    federated = agent_pb2.FederatedBundles(bundles=[bundle_to_proto(bundle) for bundle in bundles.values()])
    return agent_pb2.WatchEntriesResponse(federated_bundles=federated)


def _not_authorized(item: agent_pb2.NewX509SVIDParams) -> agent_pb2.X509SVIDResult:
    return agent_pb2.X509SVIDResult(
        error_code=grpc.StatusCode.PERMISSION_DENIED.value[0],
        error_message=f'agent-api: entry is not authorized for this agent: "{item.entry_id}"',
    )


def _peer_chain(leaf_pem: bytes, chain_pems: Iterable[bytes]) -> tuple[x509.Certificate, ...]:
    """The client's chain, leaf first, from gRPC's auth context (which lists the chain apart)."""
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    rest: list[x509.Certificate] = []
    for pem in chain_pems:
        rest.extend(x509.load_pem_x509_certificates(pem))
    if rest and rest[0] == leaf:
        rest = rest[1:]
    return (leaf, *rest)
