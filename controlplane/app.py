"""spiffe-server's composition root: build the parts from the configuration, run them, stop them.

Start-up order: open the store (migrating it), load or create the CA (its TTL checks already ran
when the configuration was read), publish this server's authorities in the bundle, load every
entry into the hub, issue the server's own SVID, start the federation poller, then serve the agent
API (TLS, TCP), the registration API (unix socket in a 0700 directory), the bundle endpoint (when
``federation.bundle_endpoint`` is configured) and the status endpoint. Readiness turns true
only then, and one line on stdout says so. SIGTERM or SIGINT stops the servers with a grace period
for calls in flight, then the background tasks, then the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from prometheus_client import CollectorRegistry, Counter, Gauge

from controlplane.api.agent import (
    ATTESTATION_CLIENT_CERT_PEM,
    ATTESTATION_REFUSED,
    ATTESTATION_SUCCESS,
    UNKNOWN_ATTESTATION_TYPE,
    AgentService,
    X509Issuer,
)
from controlplane.api.hub import EntryHub
from controlplane.api.registration import RegistrationService
from controlplane.attest.base import NodeAttestor
from controlplane.attest.join_token import JoinTokenAttestor
from controlplane.attest.jwks import JWKSURL, JWKSFile, JWKSSource, KeyCache
from controlplane.attest.k8s_psat import NAME as K8S_PSAT
from controlplane.attest.k8s_psat import Cluster as PsatCluster
from controlplane.attest.k8s_psat import ClusterPolicy, K8sPsatAttestor
from controlplane.attest.x509pop import X509PopAttestor
from controlplane.ca.jwtca import sign_jwt_svid
from controlplane.ca.manager import CAEvent, CAManager
from controlplane.ca.svid import public_key_from_csr, sign_x509_svid
from controlplane.config import BundleEndpointSection, K8sPsatSection, ServerConfig
from controlplane.federation.client import FetchLimits, fetch_bundle, web_context
from controlplane.federation.endpoint import (
    BundleDocument,
    BundleEndpoint,
    FileCredentials,
    ServingCredentials,
    SVIDCredentials,
)
from controlplane.federation.poller import BundlePoller
from controlplane.federation.relationship import FederationRelationship
from controlplane.federation.schedule import RefreshPolicy
from controlplane.model import SERVER_DNS_NAME, server_id
from controlplane.store import ChangeFeed, Store, sqlite_url
from spiffecore import SpiffeBundle, SpiffeError, SpiffeID, TrustDomain
from spiffecore.der import dump_pem_certificates
from spiffeops.lifecycle import wait_for_shutdown_signal, write_atomically
from spiffeops.status import StatusServer, parse_host_port
from spiffeproto import agent_pb2_grpc, registration_pb2_grpc

TICK_INTERVAL: Final = 10.0
SHUTDOWN_GRACE: Final = 5.0
PRUNE_AFTER: Final = timedelta(hours=24)

log = logging.getLogger("spiffe-server")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Metrics:
    """The server's Prometheus metrics; also what the agent API reports to (:class:`AgentMetrics`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.x509_signed = Counter("spiffe_server_x509_svids_signed", "X.509-SVIDs signed", registry=registry)
        self.jwt_signed = Counter("spiffe_server_jwt_svids_signed", "JWT-SVIDs signed", registry=registry)
        self.ca_expiry = Gauge(
            "spiffe_server_x509_ca_expiry_timestamp_seconds", "When the active X.509 CA expires", registry=registry
        )
        self.entries = Gauge("spiffe_server_entries", "Registration entries known to this server", registry=registry)
        self.attestations = Counter(
            "spiffe_server_agent_attestations",
            "Agent attestations by attestation type (unknown: not an enabled one) and result (success, refused)",
            ["attestation_type", "result"],
            registry=registry,
        )
        self.watch_streams = Gauge(
            "spiffe_server_watch_streams", "Open WatchEntries streams of agents on this server", registry=registry
        )
        self.bundle_endpoint_requests = Counter(
            "spiffe_server_bundle_endpoint_requests",
            "Connections to the bundle endpoint by result (ok, or why it failed: tls_error, timeout, ...)",
            ["result"],
            registry=registry,
        )
        self.federation_fetches = Counter(
            "spiffe_server_federation_fetches",
            "Fetches of federated trust domains' bundles by result (success, failure)",
            ["result"],
            registry=registry,
        )

    def expect_attestation_types(self, names: Iterable[str]) -> None:
        """Show a zero for every result of these types (and of unknown ones) before the first attestation."""
        for name in (*names, UNKNOWN_ATTESTATION_TYPE):
            for result in (ATTESTATION_SUCCESS, ATTESTATION_REFUSED):
                self.attestations.labels(attestation_type=name, result=result)

    def attestation(self, attestation_type: str, result: str) -> None:
        self.attestations.labels(attestation_type=attestation_type, result=result).inc()

    def watch_opened(self) -> None:
        self.watch_streams.inc()

    def watch_closed(self) -> None:
        self.watch_streams.dec()

    def bundle_endpoint_request(self, result: str) -> None:
        self.bundle_endpoint_requests.labels(result=result).inc()

    def federation_fetch(self, result: str) -> None:
        self.federation_fetches.labels(result=result).inc()


class CASigner:
    """The agent API's signer over the CA manager: rotates before signing, publishes new authorities."""

    def __init__(
        self,
        manager: CAManager,
        *,
        x509_ttl: timedelta,
        jwt_ttl: timedelta,
        clock: Callable[[], datetime],
        on_events: Callable[[list[CAEvent]], None],
        metrics: Metrics,
    ) -> None:
        self._manager = manager
        self._x509_ttl = x509_ttl
        self._jwt_ttl = jwt_ttl
        self._clock = clock
        self._on_events = on_events
        self._metrics = metrics
        self._lock = threading.Lock()

    def tick(self) -> datetime:
        """Take any rotation step due now; return the time the step was judged at."""
        with self._lock:
            now = self._clock()
            events = self._manager.tick(now)
        if events:
            self._on_events(events)
        self._metrics.ca_expiry.set(self._manager.x509_authority.not_after.timestamp())
        return now

    def public_key_from_csr(self, csr_der: bytes) -> object:
        return public_key_from_csr(csr_der)

    def roots(self) -> tuple[x509.Certificate, ...]:
        """The root(s) the active authority's SVIDs chain to."""
        return self._manager.x509_authority.roots

    def x509_issuer(self) -> X509Issuer:
        """Rotate if due, once; the issuer signs with the authority active now, valid from now.

        For a batch: the rotation check (a lock, the schedule of both kinds of authority, the
        expiry gauge) is paid once, not per SVID. The authority stays usable for the whole batch
        however long it takes, since an authority signs for a sixth of its life after the next
        one takes over.
        """
        now = self.tick()
        authority = self._manager.x509_authority
        default_ttl = self._x509_ttl
        signed = self._metrics.x509_signed

        def issue(
            spiffe_id: SpiffeID, public_key: object, *, dns_names: tuple[str, ...], ttl: timedelta | None
        ) -> tuple[x509.Certificate, ...]:
            chain = sign_x509_svid(
                authority,
                spiffe_id=spiffe_id,
                public_key=public_key,  # type: ignore[arg-type]
                dns_names=dns_names,
                ttl=ttl or default_ttl,
                now=now,
            )
            signed.inc()
            return chain

        return issue

    def x509_svid(
        self, spiffe_id: SpiffeID, public_key: object, *, dns_names: tuple[str, ...], ttl: timedelta | None
    ) -> tuple[x509.Certificate, ...]:
        return self.x509_issuer()(spiffe_id, public_key, dns_names=dns_names, ttl=ttl)

    def jwt_svid(
        self, spiffe_id: SpiffeID, audience: tuple[str, ...], *, ttl: timedelta | None
    ) -> tuple[str, datetime]:
        now = self.tick()
        lifetime = ttl or self._jwt_ttl
        token = sign_jwt_svid(
            self._manager.jwt_authority, spiffe_id=spiffe_id, audience=audience, ttl=lifetime, now=now
        )
        self._metrics.jwt_signed.inc()
        return token, now + lifetime


@dataclass
class ServerIdentity:
    """The server's own SVID for the agent API's TLS, renewed at half its life."""

    chain: tuple[x509.Certificate, ...]
    key_pem: bytes
    roots: tuple[x509.Certificate, ...] = ()

    def renew_at(self) -> datetime:
        leaf = self.chain[0]
        return leaf.not_valid_before_utc + (leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2

    def credentials(self, client_roots_pem: bytes) -> grpc.ServerCertificateConfiguration:
        # The presented chain ends with the trust domain's root, so an agent bootstrapping with
        # --insecure-bootstrap (trust on first use) can take the root from the handshake.
        presented = dump_pem_certificates((*self.chain, *self.roots))
        return grpc.ssl_server_certificate_configuration(
            [(self.key_pem, presented)], root_certificates=client_roots_pem
        )


def client_roots_pem(bundle: SpiffeBundle | None) -> bytes:
    """The roots client certificates must chain to during the handshake.

    The trust domain's X.509 authorities, so agents' SVIDs pass, and the attestation client
    certificate, so agents that have no SVID yet can call AttestAgent (see
    :data:`controlplane.api.agent.ATTESTATION_CLIENT_CERT_PEM`). The agent API verifies the
    chain itself afterwards; this handshake check is not what authenticates an agent.
    """
    authorities = bundle.x509.authorities if bundle is not None else ()
    return dump_pem_certificates(authorities) + ATTESTATION_CLIENT_CERT_PEM


class RotatingCredentials:
    """Hands gRPC the newest server identity and client roots: it asks before every handshake.

    The roots follow the trust bundle, so an agent whose SVID another server of the trust domain
    signed (its authority arrived in the bundle later) is accepted as soon as this server's hub
    has that bundle, not at the next renewal of this server's own SVID.
    """

    def __init__(self, identity: ServerIdentity, bundle: Callable[[], SpiffeBundle | None]) -> None:
        self.current = identity
        self._bundle = bundle
        self._served: tuple[ServerIdentity, SpiffeBundle | None] | None = None

    def initial(self) -> grpc.ServerCertificateConfiguration:
        current, bundle = self.current, self._bundle()
        self._served = (current, bundle)
        return current.credentials(client_roots_pem(bundle))

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration once per renewal or bundle change; ``None`` (keep the current one) otherwise."""
        current, bundle = self.current, self._bundle()
        served = self._served
        if served is not None and served[0] is current and served[1] is bundle:
            return None
        self._served = (current, bundle)
        return current.credentials(client_roots_pem(bundle))


def _server_instance_id(data_dir: Path) -> str:
    """A stable ID for this server (its authorities are filed under it in the shared bundle)."""
    path = data_dir / "server-id"
    if path.exists():
        return path.read_text().strip()
    value = uuid.uuid4().hex
    write_atomically(path, (value + "\n").encode(), mode=0o644)
    return value


def _attestors(config: ServerConfig, store: Store) -> dict[str, NodeAttestor]:
    trust_domain = config.trust_domain_value
    attestors: dict[str, NodeAttestor] = {}
    if config.attestors.join_token.enabled:
        attestors["join_token"] = JoinTokenAttestor(trust_domain=trust_domain, tokens=store, clock=utcnow)
    if config.attestors.x509pop.ca_bundle is not None:
        roots = x509.load_pem_x509_certificates(config.attestors.x509pop.ca_bundle.read_bytes())
        attestors["x509pop"] = X509PopAttestor(trust_domain=trust_domain, roots=roots, clock=utcnow)
    if config.attestors.k8s_psat.clusters:
        attestors[K8S_PSAT] = K8sPsatAttestor(
            trust_domain=trust_domain, clusters=_psat_clusters(config.attestors.k8s_psat), clock=utcnow
        )
    return attestors


def _psat_clusters(section: K8sPsatSection) -> list[PsatCluster]:
    """The k8s_psat clusters; their JWKS files are read now, so a bad one stops the start-up."""
    clusters = []
    for name, cluster in section.clusters.items():
        source: JWKSSource
        if cluster.jwks_url is not None:
            source = JWKSURL(cluster.jwks_url, ca_file=cluster.jwks_ca_file, token_file=cluster.jwks_token_file)
        else:
            assert cluster.jwks_file is not None  # the config allows exactly one of the two
            source = JWKSFile(cluster.jwks_file)
        keys = KeyCache(source)
        if isinstance(source, JWKSFile):
            keys.load()
        policy = ClusterPolicy.build(
            name, allow_list=cluster.service_account_allow_list, audience=cluster.audience, issuer=cluster.issuer
        )
        clusters.append(PsatCluster(policy=policy, keys=keys))
    return clusters


class Server:
    """A running spiffe-server."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.ready = False
        self.agent_port = 0

    def readiness(self) -> tuple[bool, str]:
        return (True, "serving") if self.ready else (False, "starting")

    async def run(self, *, announce: Callable[[str], None] = print, stop: asyncio.Event | None = None) -> None:
        config = self.config
        trust_domain = config.trust_domain_value
        data_dir = config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        instance = _server_instance_id(data_dir)
        url = config.database_url or sqlite_url(data_dir)
        store = await asyncio.to_thread(Store.open, url)
        status: StatusServer | None = None
        tasks: list[asyncio.Task[None]] = []
        servers: list[grpc.aio.Server] = []
        feed: ChangeFeed | None = None
        hub: EntryHub | None = None
        bundle_endpoint: BundleEndpoint | None = None
        # BatchNewX509SVID's CSR checks (cryptography releases the GIL while it verifies).
        csr_checks = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="csr-check")
        try:
            manager = await asyncio.to_thread(CAManager.load_or_create, data_dir, config.ca_config(), now=utcnow())
            hub = EntryHub(store, trust_domain, recheck=timedelta(seconds=5))

            def publish(events: Sequence[CAEvent]) -> None:
                for event in events:
                    log.info(
                        "ca: %s", event.kind.name.lower().replace("_", " "), extra={"authority": event.authority_id}
                    )
                self._publish(store, instance, manager)
                hub.poke()

            signer = CASigner(
                manager,
                x509_ttl=config.svid.x509_ttl,
                jwt_ttl=config.svid.jwt_ttl,
                clock=utcnow,
                on_events=publish,
                metrics=self.metrics,
            )
            await asyncio.to_thread(self._publish, store, instance, manager)
            await asyncio.to_thread(signer.tick)
            await hub.load()
            self.metrics.entries.set(len(hub.index))
            feed = ChangeFeed(store, recheck_interval=config.recheck_interval.total_seconds())
            feed.subscribe(lambda _version: hub.poke())
            await asyncio.to_thread(feed.start)
            tasks.append(asyncio.create_task(hub.run(), name="entry-hub"))

            identity = RotatingCredentials(
                await asyncio.to_thread(self._issue_identity, signer, trust_domain), lambda: hub.bundle
            )

            attestors = _attestors(config, store)
            self.metrics.expect_attestation_types(attestors)
            agent_server = grpc.aio.server(
                options=[
                    # agents send keepalive pings every 60 s on their watch streams
                    ("grpc.http2.min_recv_ping_interval_without_data_ms", 30_000),
                    ("grpc.so_reuseport", 0),
                ]
            )
            agent_pb2_grpc.add_AgentAPIServicer_to_server(
                AgentService(
                    store=store,
                    hub=hub,
                    signer=signer,
                    attestors=attestors,
                    trust_domain=trust_domain,
                    clock=utcnow,
                    agent_svid_ttl=config.svid.agent_ttl,
                    csr_checks=csr_checks,
                    metrics=self.metrics,
                ),
                agent_server,
            )
            # gRPC's Python server can either not ask for a client certificate at all (then no RPC
            # could authenticate an agent) or require one; it cannot ask for one optionally. So a
            # certificate is required, and agents without an SVID attest with the public
            # attestation client certificate (see client_roots_pem).
            credentials = grpc.dynamic_ssl_server_credentials(
                identity.initial(),
                identity.fetch,  # type: ignore[arg-type]  # gRPC takes None as "no change"; its stub says otherwise
                require_client_authentication=True,
            )
            host, port = parse_host_port(config.bind)
            self.agent_port = agent_server.add_secure_port(
                f"[{host}]:{port}" if ":" in host else f"{host}:{port}", credentials
            )
            servers.append(agent_server)

            poller = _federation_poller(config, store, on_change=hub.poke, metrics=self.metrics)
            tasks.append(asyncio.create_task(poller.run(), name="federation-poller"))
            admin_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            registration_pb2_grpc.add_RegistrationAPIServicer_to_server(
                RegistrationService(
                    store=store,
                    trust_domain=trust_domain,
                    clock=utcnow,
                    on_change=hub.poke,
                    on_agent_change=hub.wake,
                    federation=poller,
                ),
                admin_server,
            )
            socket_path = _prepare_admin_socket(config.admin_socket_path)
            admin_server.add_insecure_port(f"unix:{socket_path}")
            servers.append(admin_server)

            for server in servers:
                await server.start()
            if config.federation.bundle_endpoint is not None:
                bundle_endpoint = _bundle_endpoint(
                    config.federation.bundle_endpoint, identity=identity, hub=hub, metrics=self.metrics
                )
                await bundle_endpoint.start()
            if config.status is not None:
                status_host, status_port = parse_host_port(config.status)
                status = StatusServer(status_host, status_port, readiness=self.readiness, registry=self.registry)
                status.start()

            async def rotate() -> None:
                next_prune = utcnow()
                while True:
                    await asyncio.sleep(TICK_INTERVAL)
                    try:
                        await asyncio.to_thread(signer.tick)
                        if utcnow() >= identity.current.renew_at():
                            identity.current = await asyncio.to_thread(self._issue_identity, signer, trust_domain)
                        if utcnow() >= next_prune:
                            await asyncio.to_thread(store.remove_expired_authorities, utcnow() - PRUNE_AFTER)
                            await asyncio.to_thread(store.remove_expired_join_tokens, utcnow())
                            next_prune = utcnow() + timedelta(hours=1)
                        self.metrics.entries.set(len(hub.index))
                    except SpiffeError:
                        log.exception("rotation step failed; retrying in %ss", TICK_INTERVAL)

            tasks.append(asyncio.create_task(rotate(), name="ca-rotation"))
            self.ready = True
            log.info(
                "spiffe-server ready",
                extra={
                    "trust_domain": trust_domain.name,
                    "agent_api": f"{host}:{self.agent_port}",
                    "admin_socket": str(socket_path),
                },
            )
            announce(
                f"spiffe-server ready: trust domain {trust_domain.name}, agent API on {host}:{self.agent_port}, "
                f"admin socket {socket_path}"
            )
            if stop is None:
                received = await wait_for_shutdown_signal()
                log.info("shutting down", extra={"signal": received.name})
            else:
                await stop.wait()
        finally:
            self.ready = False
            if bundle_endpoint is not None:
                await bundle_endpoint.close()
            if hub is not None:
                await hub.close()
            for server in servers:
                await server.stop(SHUTDOWN_GRACE)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if status is not None:
                status.stop()
            csr_checks.shutdown(cancel_futures=True)
            if feed is not None:
                await asyncio.to_thread(feed.close)
            await asyncio.to_thread(store.close)

    @staticmethod
    def _publish(store: Store, instance: str, manager: CAManager) -> None:
        """Put this server's current and prepared authorities into the shared bundle."""
        for root in manager.x509_roots():
            store.add_x509_authority(instance, root)
        for authority in (manager.jwt_authority, manager.next_jwt_authority):
            if authority is not None:
                store.add_jwt_authority(instance, authority.kid, authority.public_key, authority.not_after)

    @staticmethod
    def _issue_identity(signer: CASigner, trust_domain: TrustDomain) -> ServerIdentity:
        key = ec.generate_private_key(ec.SECP256R1())
        chain = signer.x509_svid(server_id(trust_domain), key.public_key(), dns_names=(SERVER_DNS_NAME,), ttl=None)
        return ServerIdentity(
            chain=chain,
            key_pem=key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
            roots=signer.roots(),
        )


def _federation_poller(
    config: ServerConfig, store: Store, *, on_change: Callable[[], None], metrics: Metrics
) -> BundlePoller:
    """The poller of federated bundles; the extra web roots are read now, so a bad file stops the start-up."""
    section = config.federation
    web = web_context(section.web_roots)
    limits = FetchLimits(timeout=section.fetch_timeout.total_seconds())

    def fetch(relationship: FederationRelationship, *, trusted: SpiffeBundle | None, now: datetime) -> SpiffeBundle:
        return fetch_bundle(relationship, trusted=trusted, now=now, web=web, limits=limits)

    policy = RefreshPolicy(min_interval=section.min_refresh_interval, max_interval=section.max_refresh_interval)
    return BundlePoller(store=store, fetch=fetch, clock=utcnow, on_change=on_change, policy=policy, metrics=metrics)


def _bundle_endpoint(
    section: BundleEndpointSection, *, identity: RotatingCredentials, hub: EntryHub, metrics: Metrics
) -> BundleEndpoint:
    """The bundle endpoint: the server's SVID (following its renewals) or the configured files."""
    credentials: ServingCredentials
    if section.profile == "https_web":
        assert section.cert is not None, "checked by the configuration"
        assert section.key is not None, "checked by the configuration"
        credentials = FileCredentials(section.cert, section.key)
    else:
        credentials = SVIDCredentials(lambda: (identity.current.chain, identity.current.key_pem))
    host, port = parse_host_port(section.address)
    document = BundleDocument(lambda: hub.bundle, refresh_hint=int(section.refresh_hint.total_seconds()))
    return BundleEndpoint(host=host, port=port, credentials=credentials, document=document, metrics=metrics)


def _prepare_admin_socket(path: Path) -> Path:
    """Make the socket's directory 0700 and remove a stale socket file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # noqa: PTH101 - the directory, whatever the umask made it
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return path
