"""End to end with real Envoy 1.40: certificates over SDS from our agent, mTLS between two Envoys.

Set-up: a real ``spiffe-server`` (subprocess) and the agent's composition root
(:class:`sidecar.agent.app.Agent`) running in this test's event loop, its public socket in a
short temporary directory. Two Envoys run as the same uid as the test, so uid and gid cannot tell
them apart without privileges; each is started through its own hard link to the Envoy binary and
the agent attests ``unix:path`` (``discover_workload_path``, hashing off): the entry for
``/frontend`` selects one path, ``/backend`` the other. The test process itself gets ``/intruder``
by its interpreter's path: a valid SVID of the same trust domain that the backend's SAN matcher
does not allow.

Traffic: a client connects to the frontend Envoy's plain listener; the frontend's cluster speaks
mTLS (``default`` + ``ROOTCA`` over SDS, SAN must be ``/backend``) to the backend Envoy's
listener (``default`` + ``ROOTCA``, SAN must be ``/frontend``), which forwards to a small HTTP
server. Every request is a new connection, hence a new handshake with the current certificates.

The malformed-secret test serves SDS from the servicer alone, over a test identity provider whose
SVID is swapped for a certificate with a key that does not match: Envoy must NACK it and keep the
certificate it had.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from sidecar.agent.app import Agent
from sidecar.agent.config import AgentConfig, UnixAttestorSection, WorkloadAttestorsSection
from sidecar.sds.service import SecretDiscoveryService, add_to_server
from sidecar.workload.client import WorkloadAPIClient
from spiffecore import X509SVID
from spiffecore.tls import load_svid
from spiffeproto import registration_pb2, registration_pb2_grpc
from tests.sidecar.workload.support import CallerBox, FakeIdentities, StaticAttestor
from tests.support.ca import TestCA, new_key
from tests.support.envoy import EnvoyProcess, linked_binary, sds_cluster, sds_config, start_envoy
from tests.support.server import ServerProcess, running_server

TD = "spiffe://example.org"
FRONTEND = f"{TD}/frontend"
BACKEND = f"{TD}/backend"
INTRUDER = f"{TD}/intruder"
ROTATIONS = 20
BODY = b"hello from the backend"
DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"

log = logging.getLogger(__name__)


# --- the pieces ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("sds-server") / "data") as process:
        yield process


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    directory = Path(f"/tmp/sds-e2e-{os.getpid()}-{time.monotonic_ns()}")  # noqa: S108
    directory.mkdir()
    yield directory
    for child in directory.iterdir():
        child.unlink(missing_ok=True)
    directory.rmdir()


class HTTPBackend:
    """A tiny HTTP/1.0 server: answers every request with :data:`BODY` and closes."""

    def __init__(self) -> None:
        self.served = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
            await writer.drain()
            self.served += 1
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def http_get(port: int, *, timeout: float = 5.0) -> bytes:
    """One request on a new connection; the response body (empty if the connection was dropped)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.0\r\nHost: backend\r\n\r\n")
            await writer.drain()
            response = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    return response.partition(b"\r\n\r\n")[2]


@dataclass
class Traffic:
    """Requests one after another through the frontend, counting successes and failures."""

    port: int
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                body = await http_get(self.port)
            except (OSError, TimeoutError) as err:
                self.failures.append(repr(err))
            else:
                if body == BODY:
                    self.ok += 1
                else:
                    self.failures.append(f"unexpected body {body!r}")
            await asyncio.sleep(0.002)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def tls_context(*, san: str, sds_cluster_name: str = "agent") -> dict[str, Any]:
    """``common_tls_context``: our SVID (``default``) and ``ROOTCA`` over SDS, the peer's SAN pinned."""
    return {
        "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds_config(sds_cluster_name)}],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": san}}]
            },
            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds_config(sds_cluster_name)},
        },
    }


def tcp_proxy(cluster: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": cluster,
                "cluster": cluster,
            },
        }
    ]


def static_cluster(name: str, port: int, transport_socket: dict[str, Any] | None = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    ]
                }
            ],
        },
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    return cluster


def listener(name: str, cluster: str, transport_socket: dict[str, Any] | None = None) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": tcp_proxy(cluster)}
    if transport_socket is not None:
        chain["transport_socket"] = transport_socket
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [chain],
    }


def backend_bootstrap(agent_socket: Path, app_port: int) -> dict[str, Any]:
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DOWNSTREAM_TLS,
            "require_client_certificate": True,
            "common_tls_context": tls_context(san=FRONTEND),
        },
    }
    return {
        "node": {"id": "backend-sidecar", "cluster": "backend"},
        "static_resources": {
            "listeners": [listener("inbound", "local_app", tls)],
            "clusters": [static_cluster("local_app", app_port), sds_cluster("agent", agent_socket)],
        },
    }


def frontend_bootstrap(agent_socket: Path, backend_port: int) -> dict[str, Any]:
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS,
            "common_tls_context": tls_context(san=BACKEND),
        },
    }
    return {
        "node": {"id": "frontend-sidecar", "cluster": "frontend"},
        "static_resources": {
            "listeners": [listener("outbound", "backend_mtls")],
            "clusters": [static_cluster("backend_mtls", backend_port, tls), sds_cluster("agent", agent_socket)],
        },
    }


@dataclass
class RunningAgent:
    agent: Agent
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 20)


async def run_agent(config: AgentConfig) -> RunningAgent:
    agent = Agent(config)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(announce=lambda _: None, stop=stop))
    async with asyncio.timeout(30):
        while not agent.readiness()[0]:
            if task.done():
                task.result()
                raise AssertionError("agent stopped before it was ready")
            await asyncio.sleep(0.02)
    return RunningAgent(agent, stop, task)


@dataclass
class Mesh:
    server: ServerProcess
    config: AgentConfig
    agent: RunningAgent
    backend: EnvoyProcess
    frontend: EnvoyProcess
    app: HTTPBackend
    entries: dict[str, Any]
    port: int  # the frontend's plain listener


async def update_entry(server: ServerProcess, entry_id: str, ttl: int) -> None:
    """Change an entry's X.509-SVID TTL: the agent signs a new SVID for it at once."""
    async with grpc.aio.insecure_channel(f"unix:{server.admin_socket}") as channel:
        stub = registration_pb2_grpc.RegistrationAPIStub(channel)
        entry = await stub.GetEntry(registration_pb2.GetEntryRequest(id=entry_id))
        entry.x509_svid_ttl = ttl
        await stub.UpdateEntry(registration_pb2.UpdateEntryRequest(entry=entry))


@pytest.fixture
async def mesh(server: ServerProcess, tmp_path: Path, short_dir: Path) -> AsyncIterator[Mesh]:
    node_id = f"{TD}/node-{time.monotonic_ns()}"
    token = await server.atoken("--spiffe-id", node_id)
    binaries = tmp_path / "bin"
    frontend_bin = linked_binary(binaries, "frontend-envoy")
    backend_bin = linked_binary(binaries, "backend-envoy")
    own_exe = Path("/proc/self/exe").readlink()
    entries = {}
    for spiffe_id, path in ((FRONTEND, frontend_bin), (BACKEND, backend_bin), (INTRUDER, own_exe)):
        entries[spiffe_id] = await server.acli_json(
            "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", node_id, "--selector", f"unix:path:{path}"
        )
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(server.roots_pem())
    config = AgentConfig(
        trust_domain="example.org",
        server=server.address,
        trust_bundle=bundle,
        join_token=token,
        data_dir=tmp_path / "agent",
        socket=short_dir / "agent.sock",
        workload_attestors=WorkloadAttestorsSection(
            unix=UnixAttestorSection(discover_workload_path=True, workload_size_limit=-1)
        ),
    )
    agent = await run_agent(config)
    app = HTTPBackend()
    app_port = await app.start()
    envoys: list[EnvoyProcess] = []
    try:
        backend = start_envoy(
            "backend", backend_bootstrap(config.socket, app_port), tmp_path / "envoy", executable=backend_bin
        )
        envoys.append(backend)
        await backend.wait_for(lambda e: len(e.serials()) == 1)
        frontend = start_envoy(
            "frontend",
            frontend_bootstrap(config.socket, backend.listener_port("inbound")),
            tmp_path / "envoy",
            executable=frontend_bin,
        )
        envoys.append(frontend)
        await frontend.wait_for(lambda e: len(e.serials()) == 1)
        yield Mesh(
            server=server,
            config=config,
            agent=agent,
            backend=backend,
            frontend=frontend,
            app=app,
            entries=entries,
            port=frontend.listener_port("outbound"),
        )
    finally:
        for envoy in envoys:
            envoy.stop()
        await app.close()
        if not agent.task.done():
            await agent.close()


def leaf_sans(envoy: EnvoyProcess) -> set[str]:
    return {
        san["uri"]
        for context in envoy.certs()
        for cert in context.get("cert_chain", [])
        for san in cert.get("subject_alt_names", [])
        if "uri" in san
    }


async def intruder_attempt(port: int, svid: X509SVID) -> bytes:
    """mTLS straight to the backend Envoy with an SVID it must not accept; what came back."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the server's decision is under test here
    load_svid(context, svid)
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            await writer.drain()
            data = await reader.read()
            writer.close()
    except (ssl.SSLError, ConnectionError):
        return b""
    return data


# --- the tests -------------------------------------------------------------------------------------------


async def test_two_envoys_mtls_intruder_and_rotations_under_traffic(mesh: Mesh) -> None:
    assert leaf_sans(mesh.frontend) == {FRONTEND}
    assert leaf_sans(mesh.backend) == {BACKEND}
    validators = [ca["path"] for ctx in mesh.backend.certs() for ca in ctx.get("ca_cert", [])]
    assert validators == ["example.org: <inline>"]  # the SPIFFE validator, one bundle per trust domain
    assert await http_get(mesh.port) == BODY

    # A workload of the same trust domain, outside the backend's allowed SAN set, is refused.
    async with WorkloadAPIClient(f"unix://{mesh.config.socket}") as client:
        context = await client.fetch_x509_context()
    assert [str(s.id) for s in context.svids] == [INTRUDER]
    served = mesh.app.served
    assert await intruder_attempt(mesh.backend.listener_port("inbound"), context.svids[0]) == b""
    assert mesh.app.served == served
    stats = await mesh.backend.astats()
    refused = [v for k, v in stats.items() if k.startswith("listener.") and k.endswith(".ssl.fail_verify_san")]
    assert refused == [1]  # by the SAN matcher, after a valid chain

    # Forced rotations (the entry's TTL changes, the agent signs anew), alternating sides, under traffic.
    traffic = Traffic(mesh.port)
    traffic.start()
    latencies: list[float] = []
    try:
        for i in range(ROTATIONS):
            spiffe_id, envoy = (BACKEND, mesh.backend) if i % 2 == 0 else (FRONTEND, mesh.frontend)
            before = await envoy.aserials()
            started = time.monotonic()
            await update_entry(mesh.server, mesh.entries[spiffe_id]["id"], 3600 + i + 1)
            await envoy.wait_for(
                lambda e, old=before: bool(e.serials()) and e.serials().isdisjoint(old), interval=0.002
            )
            latencies.append(time.monotonic() - started)
        ok_before = traffic.ok
        await asyncio.sleep(0.2)
        assert traffic.ok > ok_before  # still flowing with the newest certificates
    finally:
        await traffic.stop()
    assert traffic.failures == []
    assert traffic.ok > ROTATIONS
    assert max(latencies) < 2.0, latencies
    log.info(
        "rotation: entry update -> new serial in envoy /certs: median %.1f ms, max %.1f ms over %d (%d requests)",
        statistics.median(latencies) * 1000,
        max(latencies) * 1000,
        len(latencies),
        traffic.ok,
    )
    for envoy in (mesh.frontend, mesh.backend):
        stats = await envoy.astats()
        assert stats["sds.default.update_rejected"] == 0
        assert stats["sds.ROOTCA.update_rejected"] == 0


async def test_agent_restart_keeps_traffic_and_envoy_resyncs(mesh: Mesh) -> None:
    traffic = Traffic(mesh.port)
    traffic.start()
    try:
        before = {envoy.name: await envoy.aserials() for envoy in (mesh.frontend, mesh.backend)}
        await mesh.agent.close()
        ok_while_down = traffic.ok
        await asyncio.sleep(0.5)
        assert traffic.ok > ok_while_down  # Envoy serves its secrets while the agent is away
        restarted = await run_agent(mesh.config)  # same data dir: no new join token needed
        mesh.agent = restarted
        started = time.monotonic()
        # The new agent signs new SVIDs; Envoy reconnects (1-4 s backoff) and must apply them.
        for envoy in (mesh.frontend, mesh.backend):
            old = before[envoy.name]
            await envoy.wait_for(lambda e, old=old: bool(e.serials()) and e.serials().isdisjoint(old), timeout=15)
        resync = time.monotonic() - started
        # Each secret has its own stream and its own reconnect backoff: ROOTCA (unchanged) may come later.
        for envoy in (mesh.frontend, mesh.backend):
            await envoy.wait_for(
                lambda e: all(
                    e.stats()[f"sds.{name}.control_plane.connected_state"] == 1 for name in ("default", "ROOTCA")
                ),
                timeout=15,
            )
        ok_after = traffic.ok
        await asyncio.sleep(0.2)
        assert traffic.ok > ok_after
    finally:
        await traffic.stop()
    assert traffic.failures == []
    for envoy in (mesh.frontend, mesh.backend):
        stats = await envoy.astats()
        assert stats["sds.default.update_rejected"] == 0
        assert stats["sds.ROOTCA.update_rejected"] == 0
    log.info("agent restart: envoy re-synced %.2f s after the agent was back", resync)


# --- a malformed secret, served by the servicer alone ---------------------------------------------------------


def mismatched(svid: X509SVID) -> X509SVID:
    """``svid`` with another private key: Envoy must refuse the pair (KEY_VALUES_MISMATCH)."""
    bad = X509SVID(id=svid.id, cert_chain=svid.cert_chain, private_key=svid.private_key, hint=svid.hint)
    object.__setattr__(bad, "private_key", new_key())  # past the constructor's check, on purpose
    return bad


async def test_malformed_secret_is_nacked_and_envoy_keeps_the_old_one(
    tmp_path: Path, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    identities = FakeIdentities(TestCA.create("example.org"))
    entry = identities.add_entry("/web")
    sds_socket = short_dir / "sds.sock"
    server = grpc.aio.server()
    add_to_server(SecretDiscoveryService(identities, CallerBox(), StaticAttestor()), server)
    server.add_insecure_port(f"unix:{sds_socket}")
    await server.start()
    app = HTTPBackend()
    app_port = await app.start()
    bootstrap = {
        "node": {"id": "nack-sidecar", "cluster": "nack"},
        "static_resources": {
            "listeners": [
                listener(
                    "inbound",
                    "local_app",
                    {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": DOWNSTREAM_TLS,
                            "common_tls_context": {
                                "tls_certificate_sds_secret_configs": [
                                    {"name": "default", "sds_config": sds_config("agent")}
                                ]
                            },
                        },
                    },
                )
            ],
            "clusters": [static_cluster("local_app", app_port), sds_cluster("agent", sds_socket)],
        },
    }
    envoy = start_envoy("nack", bootstrap, tmp_path / "envoy")
    try:
        good = entry.svid.leaf.serial_number
        good_der = entry.svid.leaf.public_bytes(Encoding.DER)
        await envoy.wait_for(lambda e: e.serials() == {good})
        with caplog.at_level(logging.WARNING, logger="sidecar.sds.service"):
            entry.svid = mismatched(identities.ca.mint("/web").svid())
            identities.bump()
            await envoy.wait_for(lambda e: e.stats().get("sds.default.update_rejected") == 1)
        assert await envoy.aserials() == {good}  # the old certificate stays
        [record] = [r for r in caplog.records if r.getMessage() == "sds: envoy rejected secrets"]
        assert "KEY_VALUES_MISMATCH" in record.__dict__["reason"]
        assert record.__dict__["node_id"] == "nack-sidecar"
        # The TLS listener still serves the old certificate.
        port = envoy.listener_port("inbound")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as tls:
            served_cert = tls.getpeercert(binary_form=True)
        assert served_cert == good_der
        # The next good rotation is accepted.
        fresh = identities.rotate(0)
        await envoy.wait_for(lambda e: e.serials() == {fresh.leaf.serial_number})
        assert (await envoy.astats())["sds.default.update_rejected"] == 1
        # Push to live: a change of the provider until Envoy's /certs shows it (polling included).
        latencies = []
        for _ in range(10):
            fresh = identities.rotate(0)
            serial = fresh.leaf.serial_number
            latencies.append(await envoy.wait_for(lambda e, s=serial: e.serials() == {s}, interval=0.001))
        assert max(latencies) < 1.0, latencies
        log.info(
            "sds push -> new serial in envoy /certs: median %.1f ms, max %.1f ms over %d",
            statistics.median(latencies) * 1000,
            max(latencies) * 1000,
            len(latencies),
        )
    finally:
        envoy.stop()
        await app.close()
        await server.stop(None)
