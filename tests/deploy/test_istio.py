"""Istio's proxies against the agent: real Envoys with Istio's SDS layout, fed by the agent's Istio socket.

The Envoys' bootstraps are shaped like an istio-proxy's: the static cluster ``sds-grpc`` (STATIC,
HTTP/2 through ``typed_extension_protocol_options``, a ``pipe`` to the socket), and TLS contexts
asking that cluster for ``default`` (the proxy's certificate) and ``ROOTCA`` (what it verifies peers
with) the way istiod writes them: ``set_node_on_first_message_only``, no initial fetch timeout, and a
``combined_validation_context`` whose default context matches the mesh's trust domain by prefix.

1. End to end: ``spiffe-server`` and ``spiffe-agent run --istio-socket`` as real processes, two
   Envoys (each through its own hard link to the binary, so the agent tells them apart by
   ``unix:path``) with IDs of Istio's form ``spiffe://<td>/ns/<ns>/sa/<sa>``: a request through the
   client's Envoy reaches the app behind the server's Envoy over mTLS, and the app sees the
   caller's ID. The main socket keeps its own names; the Istio socket also serves the Workload API.
2. Federation: Istio's ``ROOTCA`` is every bundle. The agent's SDS servicer with the Istio names,
   over an identity provider holding a federated bundle, in front of a real Envoy: a peer of the
   federated trust domain gets in, one of an unknown domain does not.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
import yaml
from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped]
from envoy.service.secret.v3 import sds_pb2_grpc  # type: ignore[import-untyped]

from sidecar.agent.istio import ISTIO_SDS
from sidecar.cli import build_parser, load_agent_config
from sidecar.sds.service import SecretDiscoveryService, add_to_server
from spiffecore import TrustDomain
from spiffeops.config import ConfigError
from tests.deploy.support import ENVOY_DIR, load_renderer
from tests.deploy.test_envoy_e2e import http_get, is_live, mtls_attempt
from tests.sidecar.workload.support import CallerBox, FakeIdentities, StaticAttestor
from tests.support.agent import (
    AgentProcess,
    agent_argv,
    free_port,
    remove_socket_dir,
    run_agent_cli_async,
    run_agent_to_exit,
    socket_dir,
    start_agent,
    write_roots,
)
from tests.support.agent import http_get as http_get_status
from tests.support.ca import TestCA
from tests.support.envoy import SECRET_TYPE, EnvoyProcess, linked_binary, sds_cluster, start_envoy
from tests.support.httpapp import HTTPApp
from tests.support.server import ServerProcess, running_server

TD: Final = "example.org"
NODE: Final = f"spiffe://{TD}/node"
FRONTEND: Final = f"spiffe://{TD}/ns/shop/sa/frontend"
BACKEND: Final = f"spiffe://{TD}/ns/shop/sa/backend"
PROBE: Final = f"spiffe://{TD}/ns/test/sa/probe"
SPIFFE_VALIDATOR: Final = "envoy.tls.cert_validator.spiffe"

render = load_renderer()


# --- Istio-shaped bootstraps ----------------------------------------------------------------------


def istio_sds(name: str) -> dict[str, Any]:
    """An ``SdsSecretConfig`` as istiod writes it: ``name`` from the cluster ``sds-grpc``."""
    return {
        "name": name,
        "sds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "set_node_on_first_message_only": True,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}],
            },
            "resource_api_version": "V3",
            "initial_fetch_timeout": "0s",
        },
    }


def istio_tls_context(san_matchers: Sequence[dict[str, str]]) -> dict[str, Any]:
    """A ``common_tls_context``: ``default`` as the certificate, ``ROOTCA`` plus SAN matchers to verify."""
    return {
        "tls_certificate_sds_secret_configs": [istio_sds("default")],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": m} for m in san_matchers]
            },
            "validation_context_sds_secret_config": istio_sds("ROOTCA"),
        },
    }


def _http_filters(stat_prefix: str, cluster: str, **extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                ".HttpConnectionManager",
                "stat_prefix": stat_prefix,
                "route_config": {
                    "virtual_hosts": [
                        {
                            "name": "all",
                            "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                        }
                    ]
                },
                "http_filters": [
                    {
                        "name": "envoy.filters.http.router",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                    }
                ],
                **extra,
            },
        }
    ]


def _plain_cluster(name: str, port: int, *, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
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
    if tls is not None:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": tls,
            },
        }
    return cluster


def _node(name: str, namespace: str) -> dict[str, Any]:
    # The node an istio-proxy sends: sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local
    return {
        "id": f"sidecar~127.0.0.1~{name}.{namespace}~{namespace}.svc.cluster.local",
        "cluster": f"{name}.{namespace}",
    }


def server_bootstrap(socket: Path, app_port: int, trust_domains: Sequence[str]) -> dict[str, Any]:
    """The server side: mTLS on ``inbound`` (any peer of ``trust_domains``) to the app, XFCC set."""
    matchers = [{"prefix": f"spiffe://{td}/"} for td in trust_domains]
    return {
        "node": _node("backend", "shop"),
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
                                    ".DownstreamTlsContext",
                                    "require_client_certificate": True,
                                    "common_tls_context": istio_tls_context(matchers),
                                },
                            },
                            "filters": _http_filters(
                                "inbound",
                                "app",
                                forward_client_cert_details="SANITIZE_SET",
                                set_current_client_cert_details={"uri": True},
                            ),
                        }
                    ],
                }
            ],
            "clusters": [_plain_cluster("app", app_port), sds_cluster("sds-grpc", socket)],
        },
    }


def client_bootstrap(socket: Path, upstream_port: int, upstream_id: str) -> dict[str, Any]:
    """The client side: plaintext ``outbound`` on loopback, mTLS to the upstream proving ``upstream_id``."""
    tls = istio_tls_context([{"exact": upstream_id}])
    return {
        "node": _node("frontend", "shop"),
        "static_resources": {
            "listeners": [
                {
                    "name": "outbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": _http_filters("outbound", "upstream")}],
                }
            ],
            "clusters": [_plain_cluster("upstream", upstream_port, tls=tls), sds_cluster("sds-grpc", socket)],
        },
    }


async def start_istio_envoy(
    name: str, bootstrap: dict[str, Any], workdir: Path, executable: Path | None = None
) -> EnvoyProcess:
    envoy = await asyncio.to_thread(start_envoy, name, bootstrap, workdir, executable=executable)
    try:
        await envoy.wait_for(is_live, timeout=20.0)
    except BaseException:
        envoy.stop()
        raise
    return envoy


def active_secrets(envoy: EnvoyProcess) -> dict[str, dict[str, Any]]:
    """``/config_dump``'s dynamic active secrets, by name."""
    document = json.loads(envoy.get("/config_dump?resource=dynamic_active_secrets"))
    return {config["name"]: config["secret"] for config in document.get("configs", [])}


def validator_domains(secret: dict[str, Any]) -> list[str]:
    """The trust domains of a SPIFFE validator secret (fails if it is anything else)."""
    validator = secret["validation_context"]["custom_validator_config"]
    assert validator["name"] == SPIFFE_VALIDATOR, secret
    return [domain["name"] for domain in validator["typed_config"]["trust_domains"]]


def xfcc(body: bytes) -> dict[str, str]:
    return dict(part.split("=", 1) for part in body.decode().split(";"))


# --- the flag -------------------------------------------------------------------------------------------


def test_istio_socket_flag_enables_the_second_socket() -> None:
    args = build_parser().parse_args(["run", "--trust-domain", TD, "--istio-socket", "/run/x/socket"])
    config = load_agent_config(args)
    assert (config.istio.enabled, config.istio.socket) == (True, Path("/run/x/socket"))
    default = load_agent_config(build_parser().parse_args(["run", "--trust-domain", TD]))
    assert (default.istio.enabled, default.istio.socket) == (False, Path("/var/run/secrets/workload-spiffe-uds/socket"))


def test_istio_socket_must_differ_from_the_main_socket() -> None:
    args = build_parser().parse_args(["run", "--trust-domain", TD, "--socket", "/run/a", "--istio-socket", "/run/a"])
    with pytest.raises(ConfigError, match=r"istio\.socket must differ from socket: both are '/run/a'"):
        load_agent_config(args)


def test_an_istio_socket_path_that_is_taken_stops_the_agent_with_the_reason(tmp_path: Path) -> None:
    sockets = socket_dir("istio-taken")
    taken = sockets / "socket"
    taken.write_text("not a socket")
    try:
        with running_server(tmp_path / "server") as server:
            argv = agent_argv(
                tmp_path / "agent",
                server=server.address,
                join_token=server.token("--spiffe-id", NODE),
                trust_bundle=write_roots(server, tmp_path / "roots.pem"),
                socket_path=sockets / "api.sock",
                extra=["--istio-socket", str(taken)],
            )
            result = run_agent_to_exit(argv)
        assert result.returncode == 1, result.describe()
        assert "spiffe-agent cannot start: frontdoor: socket path exists and is not a socket" in result.stderr
        assert str(taken) in result.stderr
        assert taken.read_text() == "not a socket", "the file in the way is left alone"
        assert not (sockets / "api.sock").exists(), "the main socket is closed and removed on the way out"
    finally:
        remove_socket_dir(sockets)


# --- 1. end to end with the real agent --------------------------------------------------------------------


@dataclass
class Node:
    server: ServerProcess
    agent: AgentProcess
    istio_socket: Path
    binaries: dict[str, Path]
    workdir: Path


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A server, entries of Istio's form, and an agent serving Istio's socket as well as its own."""
    sockets = socket_dir("istio")
    binaries = {name: linked_binary(tmp_path / "bin", f"{name}-envoy") for name in ("frontend", "backend")}
    python = Path("/proc/self/exe").readlink()  # this test process and the CLI it runs
    selectors = {
        FRONTEND: f"unix:path:{binaries['frontend']}",
        BACKEND: f"unix:path:{binaries['backend']}",
        PROBE: f"unix:path:{python}",
    }
    try:
        with running_server(tmp_path / "server") as server:
            for spiffe_id, selector in selectors.items():
                server.cli("entry", "create", "--spiffe-id", spiffe_id, "--parent-id", NODE, "--selector", selector)
            config = tmp_path / "agent.yaml"
            config.write_text(json.dumps({"workload_attestors": {"unix": {"discover_workload_path": True}}}))
            istio_socket = sockets / "workload-spiffe-uds" / "socket"  # its directory does not exist yet
            agent = start_agent(
                tmp_path / "agent",
                server.address,
                socket_path=sockets / "api.sock",
                join_token=server.token("--spiffe-id", NODE),
                trust_bundle=write_roots(server, tmp_path / "roots.pem"),
                extra=["--config", str(config), "--istio-socket", str(istio_socket)],
                status=f"127.0.0.1:{free_port()}",
            )
            try:
                wait_until_ready(agent)  # every entry has its SVID: the Envoys need no retry
                yield Node(server, agent, istio_socket, binaries, tmp_path / "envoy")
            finally:
                if agent.process.poll() is None:
                    agent.stop()
                    assert not istio_socket.exists(), "the agent left its Istio socket behind"
    finally:
        remove_socket_dir(sockets)


def wait_until_ready(agent: AgentProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while http_get_status(agent.status_url("/readyz"))[0] != 200:
        assert time.monotonic() < deadline, f"the agent did not become ready\n{agent.stderr}"
        time.sleep(0.05)


async def fetch_secrets(socket: Path, names: Sequence[str]) -> Any:
    """``FetchSecrets`` on ``socket`` as this process; the response (raises ``grpc.aio.AioRpcError``)."""
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        request = discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=list(names))
        return await stub.FetchSecrets(request, timeout=10)


async def test_istio_proxies_get_default_and_rootca_from_the_istio_socket(node: Node) -> None:
    directory = node.istio_socket.parent
    assert stat.S_ISSOCK(node.istio_socket.stat().st_mode)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755, "the socket's directory is created 0755"

    app = HTTPApp()
    app_port = await app.start()
    envoys: list[EnvoyProcess] = []
    try:
        backend = await start_istio_envoy(
            "backend", server_bootstrap(node.istio_socket, app_port, [TD]), node.workdir, node.binaries["backend"]
        )
        envoys.append(backend)
        inbound_port = backend.listener_port("inbound")
        frontend = await start_istio_envoy(
            "frontend",
            client_bootstrap(node.istio_socket, inbound_port, BACKEND),
            node.workdir,
            node.binaries["frontend"],
        )
        envoys.append(frontend)

        # Each proxy got Istio's two names from our agent: its own SVID, and the bundles as the SPIFFE validator.
        for envoy, own_id in ((backend, BACKEND), (frontend, FRONTEND)):
            secrets = await asyncio.to_thread(active_secrets, envoy)
            assert set(secrets) == {"default", "ROOTCA"}, secrets
            assert validator_domains(secrets["ROOTCA"]) == [TD]
            certs = await asyncio.to_thread(envoy.certs)
            leaf_sans = {san["uri"] for c in certs for cert in c["cert_chain"] for san in cert["subject_alt_names"]}
            assert leaf_sans == {own_id}, certs
            stats = await envoy.astats()
            assert stats["sds.default.update_success"] >= 1
            assert stats["sds.ROOTCA.update_success"] >= 1
            assert stats["sds.ROOTCA.update_rejected"] == 0

        # Over mTLS through both proxies: the app sees the caller's Istio-style ID.
        status, body = await http_get(frontend.listener_port("outbound"))
        assert status == 200, body
        fields = xfcc(body)
        assert (fields["By"], fields["URI"]) == (BACKEND, FRONTEND)

        # Our own outbound template (deploy/envoy) works against the Istio socket as well.
        text = render.render(
            (ENVOY_DIR / "outbound.yaml.tmpl").read_text(),
            {
                "AGENT_SOCKET": str(node.istio_socket),
                "ADMIN_PORT": "0",
                "LISTEN_PORT": "0",
                "UPSTREAM_ADDRESS": "127.0.0.1",
                "UPSTREAM_PORT": str(inbound_port),
                "UPSTREAM_SPIFFE_ID": BACKEND,
            },
        )
        templated = await start_istio_envoy("templated", yaml.safe_load(text), node.workdir, node.binaries["frontend"])
        envoys.append(templated)
        status, body = await http_get(templated.listener_port("outbound_http"))
        assert status == 200, body
        assert xfcc(body)["URI"] == FRONTEND

        # A peer whose trust domain the mesh does not know is refused.
        stranger = TestCA.create("other.org").mint("/ns/x/sa/y").svid()
        assert await mtls_attempt(inbound_port, stranger) == b""
    finally:
        for envoy in envoys:
            envoy.stop()
        await app.close()

    # The Istio socket has Istio's names only; the main socket keeps its own (ROOTCA and ALL).
    istio_rootca = await fetch_secrets(node.istio_socket, ["ROOTCA"])
    assert [r.type_url for r in istio_rootca.resources] == [SECRET_TYPE]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await fetch_secrets(node.istio_socket, ["ALL"])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resource name must be one of ['default', 'ROOTCA']" in str(refused.value.details())
    main = await fetch_secrets(node.agent.socket, ["default", "ROOTCA", "ALL"])
    assert len(main.resources) == 3

    # The Workload API answers on the Istio socket too.
    result = await run_agent_cli_async("api", "fetch", "x509", "--socket", str(node.istio_socket), "--output", "json")
    assert result.returncode == 0, result.describe()
    assert [svid["spiffe_id"] for svid in json.loads(result.stdout)["svids"]] == [PROBE]


# --- 2. federation: ROOTCA is every bundle --------------------------------------------------------------


@pytest.fixture
async def federated_sds() -> AsyncIterator[tuple[FakeIdentities, Path]]:
    """The SDS servicer with Istio's names over a provider that federates example.org with partner.org."""
    partner = TestCA.create("partner.org")
    identities = FakeIdentities(TestCA.create(TD), federated={partner.trust_domain: partner})
    identities.add_entry("/ns/shop/sa/backend", federates_with=("partner.org",))
    sockets = socket_dir("istio-fed")
    socket = sockets / "socket"
    server = grpc.aio.server()
    add_to_server(SecretDiscoveryService(identities, CallerBox(), StaticAttestor(), config=ISTIO_SDS), server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    try:
        yield identities, socket
    finally:
        await server.stop(None)
        shutil.rmtree(sockets, ignore_errors=True)


async def test_rootca_carries_federated_bundles(federated_sds: tuple[FakeIdentities, Path], tmp_path: Path) -> None:
    identities, socket = federated_sds
    app = HTTPApp()
    app_port = await app.start()
    envoy = await start_istio_envoy(
        "federated", server_bootstrap(socket, app_port, [TD, "partner.org"]), tmp_path / f"envoy-{os.getpid()}"
    )
    try:
        secrets = await asyncio.to_thread(active_secrets, envoy)
        assert set(secrets) == {"default", "ROOTCA"}
        assert validator_domains(secrets["ROOTCA"]) == [TD, "partner.org"]
        port = envoy.listener_port("inbound")

        partner = identities.federated_cas[TrustDomain.parse("partner.org")]
        partner_peer = partner.mint("/ns/pay/sa/api").svid()
        answer = await mtls_attempt(port, partner_peer)
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer
        assert xfcc(answer.partition(b"\r\n\r\n")[2])["URI"] == "spiffe://partner.org/ns/pay/sa/api"

        local_peer = identities.ca.mint("/ns/shop/sa/frontend").svid()
        assert (await mtls_attempt(port, local_peer)).startswith(b"HTTP/1.1 200 OK")

        # Signed by partner.org's CA but claiming example.org: each domain's roots vouch only for that domain.
        forged = partner.mint(uris=[f"spiffe://{TD}/ns/shop/sa/x"]).svid()
        assert await mtls_attempt(port, forged) == b""
        assert await mtls_attempt(port, TestCA.create("other.org").mint("/ns/x/sa/y").svid()) == b""
    finally:
        envoy.stop()
        await app.close()
