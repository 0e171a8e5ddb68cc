"""The node agent's client of the control plane's agent API (``spiffe-server``), over gRPC and TLS.

Two parts. :func:`attest` runs node attestation: it sends the attestor's evidence and a CSR,
answers the server's challenges, and returns the agent's :class:`AgentIdentity` (its X.509-SVID,
the trust bundle). :class:`AgentAPIClient` then makes every other call with that SVID as the TLS
client certificate: renewing the agent SVID, watching the entries authorized for the agent,
signing workload SVIDs in batches, JWT-SVIDs and the bundle.

The server is trusted by the trust bundle's X.509 roots and the DNS name every server's SVID
carries (:data:`SERVER_DNS_NAME`); gRPC checks DNS names, not SPIFFE IDs. Failed calls raise
:class:`ServerAPIError` with the gRPC status code and the server's message. This module and its
converters are the only part of the agent that touches the generated code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import Final, NamedTuple, Self, TypeAlias

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from spiffecore import X509SVID, PrivateKey, SpiffeBundle, SpiffeError, SpiffeID, TrustDomain
from spiffecore.der import dump_der_certificates, dump_pem_certificates
from spiffeproto import agent_pb2, agent_pb2_grpc, types_pb2

SERVER_DNS_NAME: Final = "spiffe-server.internal"
"""The DNS SAN of every spiffe-server's own SVID: a wire contract with the control plane
(``controlplane.model.SERVER_DNS_NAME``), which this package may not import."""

CHALLENGE_CONTEXT: Final = b"spiffe-sidecar x509pop challenge v1\x00"
"""What an x509pop challenge answer signs before the nonce: a wire contract with the control
plane (``controlplane.attest.x509pop.CHALLENGE_CONTEXT``), same bytes."""

JOIN_TOKEN: Final = "join_token"  # noqa: S105 - an attestor name, not a secret
X509POP: Final = "x509pop"
K8S_PSAT: Final = "k8s_psat"
DEFAULT_TIMEOUT: Final = 30.0

# The attestation client certificate and its key: a wire contract with the control plane
# (controlplane.api.agent.ATTESTATION_CLIENT_CERT_PEM). gRPC's Python server cannot ask for a client
# certificate optionally, so the agent API requires one on every call, and an agent that has no
# SVID yet attests with this one. The key is public on purpose: the certificate identifies nobody,
# and the server accepts it for AttestAgent only.
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
ATTESTATION_CLIENT_KEY_PEM: Final = b"""\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSi299ez2C/Kyqoii
UwcdSZPecRhyDJruxh6/okfFnGqhRANCAATiIIFXIVD1dZHphoP4p4JzZFRR0LWR
YQPz0cJ7fhsZFWeyBGckAAcl4vtnUNSvcuA8b8hRSWkFxoqJx4ti3hYe
-----END PRIVATE KEY-----
"""

_STATUS_BY_NUMBER: Final = {code.value[0]: code for code in grpc.StatusCode}

ChallengeAnswerer: TypeAlias = Callable[[bytes], bytes]
CSRSource: TypeAlias = PrivateKey | x509.CertificateSigningRequest | bytes
"""What a workload SVID is requested with: a private key (a CSR is made from it and the result
carries the whole :class:`X509SVID`), a CSR, or DER bytes sent as they are."""


class ServerAPIError(SpiffeError):
    """A call to the agent API failed: ``code`` is the gRPC status, ``message`` the server's reason.

    Responses the server should never send (a malformed SVID or entry) and local misuse that ends a
    conversation (a challenge with no answerer) carry a code too, stated in their message.
    """

    layer = "server-api"

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        Exception.__init__(self, code, message)  # (code, message): what rebuilds it after pickle or copy
        self.code = code
        self.message = message
        self.rule = message
        self.value = None

    def __str__(self) -> str:
        return f"{self.layer}: {self.code.name}: {self.message}"


# --- values ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AgentIdentity:
    """What attestation yields: the agent's X.509-SVID (with its key) and the trust bundle."""

    svid: X509SVID
    bundle: SpiffeBundle
    can_reattest: bool = False

    @property
    def roots_pem(self) -> bytes:
        return dump_pem_certificates(self.bundle.x509.authorities)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """A registration entry as the agent sees it: what it needs to match and serve workloads."""

    id: str
    spiffe_id: SpiffeID
    parent_id: SpiffeID
    selectors: tuple[str, ...]
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: tuple[str, ...] = ()
    federates_with: tuple[TrustDomain, ...] = ()
    hint: str = ""
    revision: int = 0
    # Unix seconds: when the entry was created (decides which of two entries keeps a shared hint).
    created_at: int = 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BundleUpdate:
    """The trust bundle, first on every watch and again whenever it changes."""

    bundle: SpiffeBundle


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FederatedBundlesUpdate:
    """The bundles of the federated trust domains the agent's entries federate with: the whole set.

    Sent first on every watch (before the snapshot) and whenever the set changes; a trust domain
    missing from it is no longer trusted.
    """

    bundles: Mapping[TrustDomain, SpiffeBundle]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotPage:
    """A page of the entries authorized for the agent; deltas follow the ``last`` page."""

    entries: tuple[Entry, ...]
    last: bool
    revision: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EntryDeltas:
    """Entries that became authorized or changed, and IDs of entries deleted or no longer authorized."""

    upserted: tuple[Entry, ...]
    removed_ids: tuple[str, ...]
    revision: int


WatchEvent: TypeAlias = BundleUpdate | FederatedBundlesUpdate | SnapshotPage | EntryDeltas


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class X509SVIDResult:
    """One item of a batch: the signed chain (and the SVID when the key was given), or an error."""

    entry_id: str
    cert_chain: tuple[x509.Certificate, ...] = ()
    svid: X509SVID | None = None
    error: ServerAPIError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class JWTSVIDGrant(NamedTuple):
    """A JWT-SVID as the server issued it."""

    spiffe_id: SpiffeID
    token: str
    expires_at: datetime


# --- converters -------------------------------------------------------------------------------


def _malformed(what: str, err: Exception) -> ServerAPIError:
    return ServerAPIError(grpc.StatusCode.INTERNAL, f"the server sent a malformed {what} ({err})")


def _spiffe_id(text: str, what: str) -> SpiffeID:
    try:
        return SpiffeID.parse(text)
    except SpiffeError as err:
        raise _malformed(what, err) from err


def entry_from_proto(message: types_pb2.Entry) -> Entry:
    try:
        federates_with = tuple(TrustDomain.parse(name) for name in message.federates_with)
    except SpiffeError as err:
        raise _malformed("entry", err) from err
    return Entry(
        id=message.id,
        spiffe_id=_spiffe_id(message.spiffe_id, "entry"),
        parent_id=_spiffe_id(message.parent_id, "entry"),
        selectors=tuple(f"{s.type}:{s.value}" for s in message.selectors),
        x509_svid_ttl=message.x509_svid_ttl,
        jwt_svid_ttl=message.jwt_svid_ttl,
        dns_names=tuple(message.dns_names),
        federates_with=federates_with,
        hint=message.hint,
        revision=message.revision,
        created_at=message.created_at,
    )


def bundle_from_proto(message: types_pb2.Bundle) -> SpiffeBundle:
    try:
        return SpiffeBundle.parse(TrustDomain.parse(message.trust_domain), message.spiffe_bundle)
    except SpiffeError as err:
        raise _malformed("bundle", err) from err


def federated_from_proto(message: agent_pb2.FederatedBundles) -> FederatedBundlesUpdate:
    bundles: dict[TrustDomain, SpiffeBundle] = {}
    for item in message.bundles:
        bundle = bundle_from_proto(item)
        if bundle.trust_domain in bundles:
            raise _malformed("federated bundles", ValueError(f"two bundles of {bundle.trust_domain}"))
        bundles[bundle.trust_domain] = bundle
    return FederatedBundlesUpdate(bundles=MappingProxyType(bundles))


def chain_from_proto(message: types_pb2.X509SVID) -> tuple[x509.Certificate, ...]:
    try:
        chain = tuple(x509.load_der_x509_certificate(der) for der in message.cert_chain)
    except ValueError as err:
        raise _malformed("X.509-SVID", err) from err
    if not chain:
        raise _malformed("X.509-SVID", ValueError("empty certificate chain"))
    return chain


def svid_from_proto(message: types_pb2.X509SVID, key: PrivateKey) -> X509SVID:
    try:
        return X509SVID.from_chain(chain_from_proto(message), key)
    except SpiffeError as err:
        raise _malformed("X.509-SVID", err) from err


def watch_event_from_proto(message: agent_pb2.WatchEntriesResponse) -> WatchEvent:
    kind = message.WhichOneof("event")
    if kind == "bundle":
        return BundleUpdate(bundle=bundle_from_proto(message.bundle))
    if kind == "federated_bundles":
        return federated_from_proto(message.federated_bundles)
    if kind == "snapshot":
        page = message.snapshot
        entries = tuple(entry_from_proto(e) for e in page.entries)
        return SnapshotPage(entries=entries, last=page.last, revision=page.revision)
    if kind == "deltas":
        deltas = message.deltas
        upserted = tuple(entry_from_proto(e) for e in deltas.upserted)
        return EntryDeltas(upserted=upserted, removed_ids=tuple(deltas.removed_ids), revision=deltas.revision)
    raise _malformed("watch event", ValueError("no event set"))


def _status(number: int) -> grpc.StatusCode:
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def _rpc_error(err: grpc.aio.AioRpcError) -> ServerAPIError:
    return ServerAPIError(err.code(), err.details() or "")


# --- keys, CSRs and x509pop -------------------------------------------------------------------


def generate_key() -> PrivateKey:
    """A new EC P-256 key, the default for agent and workload SVIDs."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: PrivateKey) -> bytes:
    """A DER PKCS#10 request for ``key``; the server takes only its public key from it."""
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, algorithm)
    return csr.public_bytes(Encoding.DER)


def x509pop_payload(chain: Sequence[x509.Certificate]) -> bytes:
    """The x509pop evidence: the node's certificate chain, leaf first, as concatenated DER."""
    return dump_der_certificates(chain)


def k8s_psat_payload(cluster: str, token: str) -> bytes:
    """The k8s_psat evidence: ``{"cluster": ..., "token": ...}`` as JSON (a wire contract with the
    control plane's ``controlplane.attest.k8s_psat``)."""
    return json.dumps({"cluster": cluster, "token": token}).encode()


def x509pop_answerer(private_key: PrivateKey) -> ChallengeAnswerer:
    """Answers x509pop challenges: signs ``CHALLENGE_CONTEXT + nonce`` with the node's key.

    ECDSA with SHA-256 (DER signature), RSA-PSS with SHA-256 and a salt as long as the digest,
    Ed25519 as it is: the scheme the server verifies.
    """

    def answer(nonce: bytes) -> bytes:
        message = CHALLENGE_CONTEXT + nonce
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            return private_key.sign(message, ec.ECDSA(hashes.SHA256()))
        if isinstance(private_key, rsa.RSAPrivateKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
            return private_key.sign(message, pss, hashes.SHA256())
        return private_key.sign(message)

    return answer


# --- channels ---------------------------------------------------------------------------------


# Keepalive pings reveal a connection that died silently (a partition, a dropped NAT entry), so
# a watch never hangs open on a dead link; the server accepts pings this often (controlplane/app.py).
CHANNEL_OPTIONS: Final = (
    ("grpc.ssl_target_name_override", SERVER_DNS_NAME),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)


def _channel(address: str, roots_pem: bytes, key_pem: bytes, chain_pem: bytes) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=roots_pem, private_key=key_pem, certificate_chain=chain_pem
    )
    return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


async def attest(
    address: str,
    *,
    roots_pem: bytes,
    attestation_type: str,
    payload: bytes,
    key: PrivateKey | None = None,
    answer_challenge: ChallengeAnswerer | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> AgentIdentity:
    """Attest this node to the server at ``address`` (``host:port``); return the agent's identity.

    ``roots_pem`` are the trust domain's X.509 roots the server's SVID must chain to (the bundle
    the agent was bootstrapped with). ``key`` becomes the agent SVID's key (a new EC P-256 key by
    default). Challenges go to ``answer_challenge``; a challenge without one ends the attestation.
    """
    agent_key = key if key is not None else generate_key()
    params = agent_pb2.AttestationParams(type=attestation_type, payload=payload, csr=make_csr(agent_key))
    async with _channel(address, roots_pem, ATTESTATION_CLIENT_KEY_PEM, ATTESTATION_CLIENT_CERT_PEM) as channel:
        stub = agent_pb2_grpc.AgentAPIStub(channel)
        call = stub.AttestAgent(None, timeout=timeout)  # None: the call is driven by read() and write()
        try:
            await call.write(agent_pb2.AttestAgentRequest(params=params))
            while True:
                response = await call.read()
                if not isinstance(response, agent_pb2.AttestAgentResponse):  # grpc.aio.EOF
                    code = await call.code()
                    raise ServerAPIError(code, await call.details() or "the server ended attestation without a result")
                step = response.WhichOneof("step")
                if step == "challenge":
                    if answer_challenge is None:
                        call.cancel()
                        raise ServerAPIError(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            f"the server sent a {attestation_type} challenge, and no answer_challenge was given",
                        )
                    answer = answer_challenge(response.challenge)
                    await call.write(agent_pb2.AttestAgentRequest(challenge_response=answer))
                    continue
                if step != "result":
                    raise _malformed("attestation response", ValueError("no step set"))
                await call.done_writing()
                result = response.result
                svid = svid_from_proto(result.svid, agent_key)
                bundle = bundle_from_proto(result.bundle)
                if svid.id.trust_domain != bundle.trust_domain:
                    raise _malformed("attestation result", ValueError("SVID and bundle of different trust domains"))
                return AgentIdentity(svid=svid, bundle=bundle, can_reattest=result.can_reattest)
        except grpc.aio.AioRpcError as err:
            raise _rpc_error(err) from err


class _Channel:
    """A channel and the calls using it, so a retired channel closes once its last call ends."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.stub = agent_pb2_grpc.AgentAPIStub(channel)
        self.calls = 0
        self.retired = False

    async def release(self) -> None:
        self.calls -= 1
        if self.retired and self.calls == 0:
            await self.channel.close(None)


class AgentAPIClient:
    """The agent API with the agent's SVID as the TLS client certificate. Use ``async with``.

    After :meth:`renew`, new calls go over a new channel with the new SVID (the server refuses
    the old one); calls already under way, such as a watch, finish on the old channel, which closes
    when the last of them ends.
    """

    def __init__(self, identity: AgentIdentity, address: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._identity = identity
        self._address = address
        self._timeout = timeout
        self._current: _Channel | None = None
        self._retired: set[_Channel] = set()

    @property
    def identity(self) -> AgentIdentity:
        """The agent's current identity (its SVID changes with :meth:`renew`)."""
        return self._identity

    async def __aenter__(self) -> Self:
        self._current = self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        channels = [*self._retired, *([self._current] if self._current is not None else [])]
        self._current = None
        self._retired.clear()
        for slot in channels:
            await slot.channel.close(None)

    def _open(self) -> _Channel:
        svid = self._identity.svid
        return _Channel(
            _channel(self._address, self._identity.roots_pem, svid.private_key_pem(), svid.cert_chain_pem())
        )

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[agent_pb2_grpc.AgentAPIAsyncStub]:
        slot = self._current
        if slot is None:
            raise RuntimeError("AgentAPIClient is not open: use it with 'async with'")
        slot.calls += 1
        try:
            yield slot.stub
        except grpc.aio.AioRpcError as err:
            raise _rpc_error(err) from err
        finally:
            await slot.release()
            if slot.retired and slot.calls == 0:
                self._retired.discard(slot)

    async def renew(self, new_key: PrivateKey | None = None) -> X509SVID:
        """A new agent SVID for ``new_key`` (a new EC P-256 key by default); later calls use it."""
        key = new_key if new_key is not None else generate_key()
        async with self._call() as stub:
            response = await stub.RenewAgent(agent_pb2.RenewAgentRequest(csr=make_csr(key)), timeout=self._timeout)
        svid = svid_from_proto(response.svid, key)
        if svid.id != self._identity.svid.id:
            raise _malformed("renewed agent SVID", ValueError(f"it names {svid.id}, not {self._identity.svid.id}"))
        self._identity = dataclasses.replace(self._identity, svid=svid)
        old, self._current = self._current, self._open()
        if old is not None:
            old.retired = True
            if old.calls == 0:
                await old.channel.close(None)
            else:
                self._retired.add(old)
        return svid

    async def watch_entries(self, page_size: int = 0) -> AsyncGenerator[WatchEvent, None]:
        """The bundle, the federated bundles, the entries authorized for this agent in snapshot pages,
        then changes as they happen.

        The stream never ends on its own; stop iterating (or close the generator) to end it.
        A new bundle is also kept for later channels (and :attr:`identity`).
        """
        async with self._call() as stub:
            call = stub.WatchEntries(agent_pb2.WatchEntriesRequest(page_size=page_size))
            try:
                async for message in call:
                    event = watch_event_from_proto(message)
                    if isinstance(event, BundleUpdate):
                        self._identity = dataclasses.replace(self._identity, bundle=event.bundle)
                    yield event
            finally:
                call.cancel()

    async def batch_new_x509_svid(self, requests: Sequence[tuple[str, CSRSource]]) -> list[X509SVIDResult]:
        """X.509-SVIDs for entries authorized for this agent, one result per ``(entry_id, key or CSR)``."""
        params = [agent_pb2.NewX509SVIDParams(entry_id=entry_id, csr=_csr_bytes(src)) for entry_id, src in requests]
        async with self._call() as stub:
            response = await stub.BatchNewX509SVID(
                agent_pb2.BatchNewX509SVIDRequest(params=params), timeout=self._timeout
            )
        if len(response.results) != len(requests):
            raise _malformed("batch response", ValueError(f"{len(response.results)} results for {len(requests)} CSRs"))
        return [
            _x509_result(entry_id, source, result)
            for (entry_id, source), result in zip(requests, response.results, strict=True)
        ]

    async def new_jwt_svid(self, entry_id: str, audience: Iterable[str]) -> JWTSVIDGrant:
        """A JWT-SVID for an entry authorized for this agent."""
        request = agent_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=list(audience))
        async with self._call() as stub:
            response = await stub.NewJWTSVID(request, timeout=self._timeout)
        try:
            expires_at = datetime.fromtimestamp(response.expires_at, UTC)
        except (OverflowError, OSError, ValueError) as err:
            raise _malformed("JWT-SVID expiry", err) from err
        return JWTSVIDGrant(_spiffe_id(response.spiffe_id, "JWT-SVID"), response.token, expires_at)

    async def get_bundle(self) -> SpiffeBundle:
        async with self._call() as stub:
            response = await stub.GetBundle(agent_pb2.GetBundleRequest(), timeout=self._timeout)
        return bundle_from_proto(response.bundle)


def _csr_bytes(source: CSRSource) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, x509.CertificateSigningRequest):
        return source.public_bytes(Encoding.DER)
    return make_csr(source)


def _x509_result(entry_id: str, source: CSRSource, result: agent_pb2.X509SVIDResult) -> X509SVIDResult:
    if result.error_code:
        error = ServerAPIError(_status(result.error_code), result.error_message)
        return X509SVIDResult(entry_id=entry_id, error=error)
    chain = chain_from_proto(result.svid)
    if isinstance(source, bytes | x509.CertificateSigningRequest):
        return X509SVIDResult(entry_id=entry_id, cert_chain=chain)
    svid = svid_from_proto(result.svid, source)
    return X509SVIDResult(entry_id=entry_id, cert_chain=chain, svid=svid)
