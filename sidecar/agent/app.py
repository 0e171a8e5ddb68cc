"""spiffe-agent's composition root: build the node agent from its configuration, run it, stop it.

Start-up order: load the agent's persisted identity or attest (a join token is needed only the
first time), start the sync session (entry watch, batch signing, rotation), start the private
gRPC server with the Workload API on an abstract unix address, then open the public socket: its
front door attests each caller by its process and relays to the private server (with
``istio.enabled``, a second socket at Istio's path serves the same with Istio's SDS names:
:mod:`sidecar.agent.istio`). Readiness turns
true when the first snapshot has arrived and every workload entry has an SVID; one line on stdout
says when the socket is open. SIGTERM or SIGINT closes the socket, lets calls in flight finish,
then stops the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Final

import grpc
from prometheus_client import CollectorRegistry, Gauge

from sidecar.agent import istio
from sidecar.agent.attestors import CombinedAttestor
from sidecar.agent.attestors.base import WorkloadAttestor
from sidecar.agent.attestors.k8s import K8sAttestor, node_name_from
from sidecar.agent.attestors.unix import UnixAttestor, UnixAttestorConfig
from sidecar.agent.config import DEFAULT_PSAT_TOKEN_PATH, AgentConfig, SDSSection, WorkloadAttestorsSection
from sidecar.agent.node import AgentNode, NodeSettings, load_or_attest
from sidecar.agent.peer import FrontDoor, grpc_backend_address
from sidecar.agent.sync import AgentSync
from sidecar.sds.resources import SDSConfig
from sidecar.sds.service import CallerOf, SecretDiscoveryService, add_to_server
from sidecar.workload.identities import IdentityProvider
from sidecar.workload.service import WorkloadAPIService
from spiffeops.lifecycle import wait_for_shutdown_signal
from spiffeops.status import StatusServer, parse_host_port
from spiffeproto import workload_pb2_grpc

SHUTDOWN_GRACE: Final = 5.0
# Many workloads hold streams open; gRPC's default soft limit cancels calls beyond 1000.
MAX_PENDING_REQUESTS: Final = 100_000

log = logging.getLogger("spiffe-agent")


def sds_config(section: SDSSection) -> SDSConfig:
    """The SDS server's settings from ``agent.yaml``'s ``sds:`` section."""
    return SDSConfig(
        default_svid_name=section.default_svid_name,
        root_ca_name=section.root_ca_name,
        all_bundles_name=section.all_bundles_name,
        disable_spiffe_validation=section.disable_spiffe_cert_validation,
    )


def workload_attestor(section: WorkloadAttestorsSection, environ: Mapping[str, str]) -> WorkloadAttestor:
    """The attestors ``agent.yaml``'s ``workload_attestors:`` enables, as one: unix always, then k8s."""
    unix = UnixAttestor(
        UnixAttestorConfig(
            discover_workload_path=section.unix.discover_workload_path,
            workload_size_limit=section.unix.workload_size_limit,
        )
    )
    if not section.k8s.enabled:
        return unix
    k8s_config = section.k8s.attestor_config()
    node_name = node_name_from(k8s_config.node_name, environ)
    k8s = K8sAttestor(dataclasses.replace(k8s_config, node_name=node_name))
    log.info(
        "k8s workload attestor enabled",
        extra={"pods_url": k8s_config.pods_url, "node_name": node_name, "proc_root": str(k8s_config.proc_root)},
    )
    return CombinedAttestor((unix, k8s))


def add_public_api(
    server: grpc.aio.Server,
    caller_of: CallerOf,
    identities: IdentityProvider,
    attestor: WorkloadAttestor,
    sds: SDSConfig,
) -> None:
    """The Workload API and SDS (with the names ``sds``) on the private server behind one public socket."""
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(
        WorkloadAPIService(identities, caller_of, attestor), server
    )
    add_to_server(SecretDiscoveryService(identities, caller_of, attestor, config=sds), server)


class Agent:
    """A running spiffe-agent."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self._sync: AgentSync | None = None
        self._front_door: FrontDoor | None = None
        self._svids = Gauge("spiffe_agent_svids", "Workload X.509-SVIDs in the cache", registry=self.registry)
        self._entries = Gauge("spiffe_agent_entries", "Registration entries in the cache", registry=self.registry)
        self._connections = Gauge(
            "spiffe_agent_connections", "Open connections on the public socket", registry=self.registry
        )
        self._svids.set_function(lambda: self._sync.cache.svid_count() if self._sync else 0)
        self._entries.set_function(lambda: len(self._sync.cache.entries) if self._sync else 0)
        self._connections.set_function(lambda: self._front_door.connections if self._front_door else 0)

    def readiness(self) -> tuple[bool, str]:
        if self._sync is None or self._front_door is None:
            return False, "starting"
        if not self._sync.ready.is_set():
            return False, "waiting for the first snapshot and its SVIDs"
        return True, "serving"

    def settings(self) -> NodeSettings:
        config = self.config
        psat = config.k8s_psat
        return NodeSettings(
            server_address=config.server,
            trust_domain=config.trust_domain_value,
            data_dir=config.data_dir,
            trust_bundle=config.trust_bundle,
            insecure_bootstrap=config.insecure_bootstrap,
            join_token=config.join_token,
            x509pop_cert=config.x509pop.cert,
            x509pop_key=config.x509pop.key,
            k8s_psat_cluster=psat.cluster if psat is not None else None,
            k8s_psat_token_path=psat.token_path if psat is not None else DEFAULT_PSAT_TOKEN_PATH,
        )

    async def run(self, *, announce: Callable[[str], None] = print, stop: asyncio.Event | None = None) -> None:
        config = self.config
        settings = self.settings()
        identity = await load_or_attest(settings)
        log.info("agent identity", extra={"agent_id": str(identity.svid.id)})
        node = AgentNode(settings, identity)
        status: StatusServer | None = None
        if config.status is not None:
            host, port = parse_host_port(config.status)
            status = StatusServer(host, port, readiness=self.readiness, registry=self.registry)
            status.start()
        server = grpc.aio.server(options=[("grpc.max_pending_requests", MAX_PENDING_REQUESTS)])
        try:
            async with AgentSync(node) as sync:
                self._sync = sync
                backend = grpc_backend_address()
                front_door = FrontDoor(config.socket, backend)
                attestor = workload_attestor(config.workload_attestors, os.environ)
                add_public_api(server, front_door.caller_of, sync.cache, attestor, sds_config(config.sds))
                server.add_insecure_port(backend)
                await server.start()
                async with front_door, contextlib.AsyncExitStack() as sockets:
                    if config.istio.enabled:  # opened before the ready line, closed before the main socket
                        await sockets.enter_async_context(
                            istio.serving(
                                config.istio.socket,
                                lambda istio_server, door: add_public_api(
                                    istio_server, door.caller_of, sync.cache, attestor, istio.ISTIO_SDS
                                ),
                            )
                        )
                    self._front_door = front_door
                    log.info(
                        "agent socket open", extra={"socket": str(config.socket), "agent_id": str(identity.svid.id)}
                    )
                    announce(f"spiffe-agent ready: {identity.svid.id} serving the Workload API on {config.socket}")
                    if stop is None:
                        received = await wait_for_shutdown_signal()
                        log.info("shutting down", extra={"signal": received.name})
                    else:
                        await stop.wait()
                    self._front_door = None
                await server.stop(SHUTDOWN_GRACE)
        finally:
            self._sync = None
            with contextlib.suppress(asyncio.CancelledError):
                await server.stop(None)
            if status is not None:
                status.stop()
