"""Federation with real processes: the ``federation`` commands, then two trust domains on one machine.

The end-to-end test runs what ``docs/federation.md`` tells an operator to do. Two servers of
different trust domains (``a.example``, ``b.example``) serve their bundles on ``https_spiffe``
bundle endpoints; each is bootstrapped with the other's ``bundle show`` output and fetches the
other's bundle from then on. One agent per trust domain; a workload of ``a.example`` calls a
service of ``b.example`` over mTLS through ``spiffe-proxy`` (client mode in A, server mode in B
allowing only A's workload) and through Envoy (the deploy/envoy templates, the ``ALL`` bundle over
SDS from our agents, the inbound allowing only A's workload by its SPIFFE ID). Then B deletes its
relationship with A, and new connections from A are refused within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from sidecar.agent.serverapi import AgentAPIClient, BundleUpdate, EntryDeltas, FederatedBundlesUpdate, SnapshotPage
from spiffecore import X509SVID
from spiffecore.der import dump_pem_certificates
from spiffecore.tls import load_svid
from tests.deploy.support import ENVOY_DIR, load_renderer
from tests.integration.support import create_entry, join, watching
from tests.sidecar.proxy.processes import start_proxy
from tests.support.agent import AgentProcess, free_port, remove_socket_dir, socket_dir, start_agent
from tests.support.ca import TestCA
from tests.support.envoy import EnvoyProcess, start_envoy
from tests.support.httpapp import HTTPApp
from tests.support.server import ServerProcess, running_server, start_server

A: Final = "a.example"
B: Final = "b.example"
CLIENT_ID: Final = f"spiffe://{A}/client"
SERVICE_ID: Final = f"spiffe://{B}/service"
# How long a change of federation may take to reach new connections (measured: well under a second).
PROPAGATION_BOUND: Final = 10.0

render = load_renderer()


# --- the federation commands against one server ---------------------------------------------------

URL: Final = "https://127.0.0.1:1/"


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        pytest.param(
            ("--bundle-endpoint-profile", "https_spiffe", "--endpoint-spiffe-id", "spiffe://other.org/spire/server"),
            1,
            "spiffe-server: federation: https_spiffe needs the federated trust domain's bundle to verify the "
            'endpoint\'s first answer: "other.org"\n',
            id="https_spiffe without a bundle",
        ),
        pytest.param(
            ("--bundle-endpoint-profile", "https_spiffe", "--trust-domain-bundle", "{bundle}"),
            1,
            'spiffe-server: federation: https_spiffe needs the endpoint SPIFFE ID: "other.org"\n',
            id="https_spiffe without an endpoint ID",
        ),
        pytest.param(
            ("--bundle-endpoint-profile", "https_web", "--bundle-endpoint-url", "http://other.org/"),
            1,
            'spiffe-server: federation: bundle endpoint URL must use the https scheme: "http://other.org/"\n',
            id="not https",
        ),
        pytest.param(
            ("--bundle-endpoint-profile", "https_web", "--trust-domain", "example.org"),
            1,
            'spiffe-server: federation: a trust domain cannot federate with itself: "example.org"\n',
            id="itself",
        ),
        pytest.param(
            ("--bundle-endpoint-profile", "https_web", "--trust-domain", "Other.org"),
            1,
            "spiffe-server: federation: --trust-domain is not a valid trust domain name (trust domain characters "
            'are limited to lowercase letters, numbers, dots, dashes, and underscores): "Other.org"\n',
            id="bad trust domain",
        ),
        pytest.param(
            ("--bundle-endpoint-profile", "https_web", "--trust-domain-bundle", "{missing}"),
            1,
            "(No such file or directory)\n",
            id="missing bundle file",
        ),
        pytest.param(
            ("--bundle-endpoint-profile", "https_web", "--trust-domain-bundle", "{garbage}"),
            1,
            "is not a pem bundle (bundle: could not parse X.509 authorities from PEM",
            id="bundle file not PEM",
        ),
        pytest.param(
            ("--bundle-endpoint-profile", "https_plain"),
            2,
            "argument --bundle-endpoint-profile: invalid choice: 'https_plain' (choose from 'https_spiffe', "
            "'https_web')\n",
            id="unknown profile",
        ),
    ],
)
def test_malformed_relationships_are_refused_and_change_nothing(
    server: ServerProcess, tmp_path: Path, argv: tuple[str, ...], code: int, message: str
) -> None:
    files = {"bundle": tmp_path / "other.pem", "missing": tmp_path / "missing.pem", "garbage": tmp_path / "garbage"}
    files["bundle"].write_bytes(server.roots_pem())  # any PEM roots will do: the server cannot check them
    files["garbage"].write_text("not a certificate\n")
    given = dict(zip(argv[::2], argv[1::2], strict=True))
    options = {"--trust-domain": "other.org", "--bundle-endpoint-url": URL} | given
    command = ["federation", "create"]
    for flag, value in options.items():
        command += [flag, value.format(**{name: str(path) for name, path in files.items()})]

    result = server.cli(*command, check=False)

    assert (result.returncode, result.stdout) == (code, "")
    assert message in result.stderr, result.stderr
    assert server.cli("federation", "list").stdout == "no federation relationships\n"


def test_a_relationship_is_created_shown_listed_refreshed_and_deleted(server: ServerProcess, tmp_path: Path) -> None:
    bundle = tmp_path / "other.pem"
    bundle.write_bytes(server.roots_pem())
    create = ("federation", "create", "--trust-domain", "other.org", "--bundle-endpoint-url", URL)
    spiffe = ("--bundle-endpoint-profile", "https_spiffe", "--endpoint-spiffe-id", "spiffe://other.org/spire/server")

    created = server.cli_json(*create, *spiffe, "--trust-domain-bundle", str(bundle))
    assert created["trust_domain"] == "other.org"
    assert created["bundle_endpoint_profile"] == "https_spiffe"
    assert created["endpoint_spiffe_id"] == "spiffe://other.org/spire/server"
    assert [key["use"] for key in created["trust_domain_bundle"]["keys"]] == ["x509-svid"]
    try:
        again = server.cli(*create, "--bundle-endpoint-profile", "https_web", check=False)
        assert again.returncode == 1
        assert (
            again.stderr
            == 'spiffe-server: store: a federation relationship with this trust domain already exists: "other.org"\n'
        )

        # Nothing listens at the URL: a refresh fails with the reason, which the relationship keeps.
        refresh = server.cli("federation", "refresh", "--trust-domain", "other.org", check=False)
        assert refresh.returncode == 1
        assert "federation: could not connect to the bundle endpoint (ConnectionRefusedError" in refresh.stderr
        shown = server.cli_json("federation", "show", "--trust-domain", "other.org")
        assert shown["last_error"].startswith("federation: could not connect to the bundle endpoint")
        assert shown["last_attempt_at"] is not None
        assert shown["refreshed_at"] is None
        assert shown["trust_domain_bundle"] == created["trust_domain_bundle"]  # the last known bundle stays

        listed = server.cli("federation", "list").stdout.splitlines()
        assert listed[0].split()[:5] == ["TRUST", "DOMAIN", "BUNDLE", "ENDPOINT", "URL"]
        assert listed[1].split()[:5] == ["other.org", URL, "https_spiffe", "spiffe://other.org/spire/server", "never"]
        text = server.cli("federation", "show", "--trust-domain", "other.org").stdout
        assert "x509_authorities         1\n" in text
    finally:
        deleted = server.cli("federation", "delete", "--trust-domain", "other.org")
    assert deleted.stdout.startswith("trust_domain             other.org\n")
    missing = server.cli("federation", "show", "--trust-domain", "other.org", check=False)
    assert missing.stderr == 'spiffe-server: store: no federation relationship with this trust domain: "other.org"\n'


async def test_agents_get_the_foreign_bundles_their_entries_federate_with(
    server: ServerProcess, tmp_path: Path
) -> None:
    foreign = TestCA.create("watched.org").bundle(sequence=3)
    bundle_file = tmp_path / "watched.json"
    bundle_file.write_bytes(foreign.to_json())
    await server.acli(
        "federation", "create", "--trust-domain", "watched.org", "--bundle-endpoint-url", URL,
        "--bundle-endpoint-profile", "https_web", "--trust-domain-bundle", str(bundle_file),
        "--trust-domain-bundle-format", "spiffe",
    )  # fmt: skip
    try:
        federating, other = await join(server), await join(server)
        await create_entry(server, federating.svid.id, "--federates-with", "watched.org")
        plain = await create_entry(server, other.svid.id)
        async with (
            AgentAPIClient(federating, server.address) as client,
            AgentAPIClient(other, server.address) as other_client,
            watching(client) as watcher,
            watching(other_client) as other_watcher,
        ):
            assert isinstance((await watcher.next())[1], BundleUpdate)
            (_, update) = await watcher.next()
            assert update == FederatedBundlesUpdate(bundles={foreign.trust_domain: foreign})
            assert isinstance((await watcher.next())[1], SnapshotPage)
            assert isinstance((await other_watcher.next())[1], BundleUpdate)
            assert (await other_watcher.next())[1] == FederatedBundlesUpdate(bundles={})  # its entry does not federate
            assert isinstance((await other_watcher.next())[1], SnapshotPage)

            # The other agent's entry starts federating: the bundle comes first, then the entry.
            await server.acli(
                "entry", "update", plain["id"], "--spiffe-id", plain["spiffe_id"], "--parent-id", str(other.svid.id),
                "--selector", "unix:uid:1000", "--federates-with", "watched.org",
            )  # fmt: skip
            assert (await other_watcher.next())[1] == FederatedBundlesUpdate(bundles={foreign.trust_domain: foreign})
            assert isinstance((await other_watcher.next())[1], EntryDeltas)

            # The relationship goes: both agents are told the set is empty.
            await server.acli("federation", "delete", "--trust-domain", "watched.org")
            assert (await watcher.next())[1] == FederatedBundlesUpdate(bundles={})
            assert (await other_watcher.next())[1] == FederatedBundlesUpdate(bundles={})
    finally:
        await server.acli("federation", "delete", "--trust-domain", "watched.org", check=False)


def test_an_https_web_endpoint_is_fetched_with_the_configured_web_roots(tmp_path: Path) -> None:
    web_ca = TestCA.create("web.example")
    leaf = web_ca.mint(uris=[], dns_names=["localhost"])
    cert, key, roots = tmp_path / "web.pem", tmp_path / "web.key", tmp_path / "web-roots.pem"
    cert.write_bytes(dump_pem_certificates(leaf.chain))
    key.write_bytes(leaf.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    roots.write_bytes(dump_pem_certificates([web_ca.cert]))
    port, status = free_port(), f"127.0.0.1:{free_port()}"
    (tmp_path / "web-server.yaml").write_text(
        f"trust_domain: web.test\nstatus: {status}\nfederation:\n  bundle_endpoint:\n"
        f"    address: 127.0.0.1:{port}\n    profile: https_web\n    cert: {cert}\n    key: {key}\n"
        f"    refresh_hint: 90s\n"
    )
    (tmp_path / "client.yaml").write_text(f"trust_domain: client.test\nfederation:\n  web_roots: {roots}\n")
    with (
        running_server(tmp_path / "web-data", config=tmp_path / "web-server.yaml") as web,
        running_server(tmp_path / "client-data", config=tmp_path / "client.yaml") as client,
    ):
        client.cli(
            "federation", "create", "--trust-domain", "web.test",
            "--bundle-endpoint-url", f"https://localhost:{port}/", "--bundle-endpoint-profile", "https_web",
        )  # fmt: skip
        refreshed = client.cli_json("federation", "refresh", "--trust-domain", "web.test")
        assert refreshed["last_error"] == ""
        assert refreshed["trust_domain_bundle"]["spiffe_refresh_hint"] == 90
        served = json.loads(web.cli("bundle", "show", "--format", "spiffe").stdout)
        assert refreshed["trust_domain_bundle"]["keys"] == served["keys"]
        metrics = http_get_text(f"http://{status}/metrics")
        assert 'spiffe_server_bundle_endpoint_requests_total{result="ok"}' in metrics


def http_get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a test's own http URL
        return str(response.read().decode())


# --- two trust domains on one machine -------------------------------------------------------------


@dataclass
class Domain:
    """One trust domain: its server (with a bundle endpoint on ``endpoint_port``) and, later, its agent."""

    name: str
    server: ServerProcess
    endpoint_port: int
    directory: Path
    agent: AgentProcess | None = None

    @property
    def endpoint_url(self) -> str:
        return f"https://127.0.0.1:{self.endpoint_port}/"


def start_domain(name: str, directory: Path) -> Domain:
    directory.mkdir(parents=True)
    port = free_port()
    config = directory / "server.yaml"
    config.write_text(f"trust_domain: {name}\nfederation:\n  bundle_endpoint:\n    address: 127.0.0.1:{port}\n")
    return Domain(
        name=name, server=start_server(directory / "data", config=config), endpoint_port=port, directory=directory
    )


def federate(domain: Domain, other: Domain) -> dict[str, Any]:
    """``federation create`` on ``domain``'s server, bootstrapped with ``other``'s ``bundle show`` output."""
    bundle = domain.directory / f"{other.name}.pem"
    bundle.write_text(other.server.cli("bundle", "show").stdout)
    created: dict[str, Any] = domain.server.cli_json(
        "federation", "create",
        "--trust-domain", other.name,
        "--bundle-endpoint-url", other.endpoint_url,
        "--bundle-endpoint-profile", "https_spiffe",
        "--endpoint-spiffe-id", f"spiffe://{other.name}/spire/server",
        "--trust-domain-bundle", str(bundle),
    )  # fmt: skip
    return created


async def eventually(check: Callable[[], Awaitable[bool]], what: str, *, timeout: float = PROPAGATION_BOUND) -> float:
    """Wait until ``check`` holds; the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def http_get(port: int, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """One request (over TLS with ``context``); the status and the body, or (0, b"") when refused."""
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
                await writer.drain()
                response = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await writer.wait_closed()
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        return 0, b""
    if not response:
        return 0, b""
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def client_context(svid: X509SVID) -> ssl.SSLContext:
    """mTLS with ``svid``; the server is not checked (only its decision about us is under test)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    load_svid(context, svid)
    return context


@pytest.fixture
def sockets() -> Iterator[Path]:
    directory = socket_dir("spiffe-federation")
    yield directory
    remove_socket_dir(directory)


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as started:
        yield started


@pytest.fixture
async def app() -> AsyncIterator[tuple[HTTPApp, int]]:
    echo = HTTPApp()
    port = await echo.start()
    yield echo, port
    await echo.close()


def start_envoy_from(template: str, name: str, values: dict[str, str], workdir: Path) -> EnvoyProcess:
    text = render.render((ENVOY_DIR / template).read_text(), {"ADMIN_PORT": "0", **values})
    return start_envoy(name, yaml.safe_load(text), workdir)


def is_live(envoy: EnvoyProcess) -> bool:
    try:
        return envoy.get("/ready").strip() == "LIVE"
    except OSError:  # 503 while the SDS secrets are awaited
        return False


async def test_two_trust_domains_federate_and_stop_when_a_relationship_is_deleted(
    tmp_path: Path, sockets: Path, stack: contextlib.ExitStack, app: tuple[HTTPApp, int]
) -> None:
    _, app_port = app
    a = start_domain(A, tmp_path / "a")
    stack.callback(a.server.stop)
    b = start_domain(B, tmp_path / "b")
    stack.callback(b.server.stop)

    # Each federates with the other over https_spiffe, bootstrapped with the other's bundle.
    federate(a, b)
    federate(b, a)
    for domain, other in ((a, b), (b, a)):

        async def fetched(domain: Domain = domain, other: Domain = other) -> bool:
            shown = await domain.server.acli_json("federation", "show", "--trust-domain", other.name)
            return shown["refreshed_at"] is not None and shown["last_error"] == ""

        await eventually(fetched, f"{domain.name} fetching the bundle of {other.name}")
        shown = domain.server.cli_json("federation", "show", "--trust-domain", other.name)
        served = json.loads(other.server.cli("bundle", "show", "--format", "spiffe").stdout)
        assert shown["trust_domain_bundle"]["spiffe_refresh_hint"] == 300  # fetched: the endpoint adds the hint
        assert shown["trust_domain_bundle"]["keys"] == served["keys"]

    # A workload in each trust domain (uid 0: this test's processes), federating with the other.
    for domain, workload, other in ((a, CLIENT_ID, b), (b, SERVICE_ID, a)):
        node = f"spiffe://{domain.name}/node"
        domain.server.cli(
            "entry", "create",
            "--spiffe-id", workload,
            "--parent-id", node,
            "--selector", "unix:uid:0",
            "--federates-with", other.name,
        )  # fmt: skip
        roots = domain.directory / "roots.pem"
        roots.write_text(domain.server.cli("bundle", "show").stdout)
        domain.agent = start_agent(
            domain.directory / "agent",
            domain.server.address,
            socket_path=sockets / domain.name / "api.sock",
            extra=["--join-token", domain.server.token("--spiffe-id", node)],
            trust_bundle=roots,
            trust_domain=domain.name,
        )
        stack.callback(domain.agent.stop)
    assert a.agent is not None
    assert b.agent is not None

    fetched_x509 = json.loads((await a.agent.aapi("fetch", "x509", "--output", "json")).stdout)
    assert [svid["spiffe_id"] for svid in fetched_x509["svids"]] == [CLIENT_ID]
    assert set(fetched_x509["federated_bundles"]) == {B}

    # spiffe-proxy: server mode in B (only A's client may call), client mode in A (only B's service is called).
    python = Path(sys.executable)
    proxy_b = start_proxy(
        python,
        [
            "--mode", "server", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{app_port}",
            "--workload-api", b.agent.endpoint, "--allow-id", CLIENT_ID,
        ],
        logs=tmp_path,
        name="spiffe-proxy-b",
    )  # fmt: skip
    stack.callback(proxy_b.stop)
    assert proxy_b.spiffe_id == SERVICE_ID
    proxy_a = start_proxy(
        python,
        [
            "--mode", "client", "--listen", "127.0.0.1:0", "--upstream", proxy_b.listen,
            "--workload-api", a.agent.endpoint, "--allow-id", SERVICE_ID,
        ],
        logs=tmp_path,
        name="spiffe-proxy-a",
    )  # fmt: skip
    stack.callback(proxy_a.stop)
    assert proxy_a.spiffe_id == CLIENT_ID
    assert await http_get(proxy_a.host_port[1]) == (200, b"")

    # Envoy: the inbound sidecar in B allows A's client; the outbound sidecar in A expects B's service.
    inbound = await asyncio.to_thread(
        start_envoy_from,
        "inbound.yaml.tmpl",
        "inbound-b",
        {
            "AGENT_SOCKET": str(b.agent.socket),
            "LISTEN_ADDRESS": "127.0.0.1",
            "LISTEN_PORT": "0",
            "APP_PORT": str(app_port),
            "ALLOWED_SPIFFE_IDS": CLIENT_ID,
            "BUNDLE_NAME": "ALL",
        },
        tmp_path / "envoy",
    )
    stack.callback(inbound.stop)
    await inbound.wait_for(is_live)
    inbound_port = inbound.listener_port("inbound_mtls")
    outbound = await asyncio.to_thread(
        start_envoy_from,
        "outbound.yaml.tmpl",
        "outbound-a",
        {
            "AGENT_SOCKET": str(a.agent.socket),
            "LISTEN_PORT": "0",
            "UPSTREAM_ADDRESS": "127.0.0.1",
            "UPSTREAM_PORT": str(inbound_port),
            "UPSTREAM_SPIFFE_ID": SERVICE_ID,
            "BUNDLE_NAME": "ALL",
        },
        tmp_path / "envoy",
    )
    stack.callback(outbound.stop)
    await outbound.wait_for(is_live)
    status, body = await http_get(outbound.listener_port("outbound_http"))
    assert status == 200, body
    fields = dict(part.split("=", 1) for part in body.decode().split(";"))
    assert (fields["By"], fields["URI"]) == (SERVICE_ID, CLIENT_ID)  # the inbound saw A's client by its ID

    # A's client, straight to B's inbound, each attempt a new connection.
    written = tmp_path / "client-svid"
    await a.agent.aapi("fetch", "x509", "--write", str(written))
    client = client_context(
        X509SVID.load_pem((written / "svid.pem").read_bytes(), (written / "svid_key.pem").read_bytes())
    )
    assert (await http_get(inbound_port, client))[0] == 200

    # B stops federating with A: new connections from A are refused by B's proxy and B's Envoy.
    deleted = await b.server.acli_json("federation", "delete", "--trust-domain", A)
    assert deleted["trust_domain"] == A

    async def proxy_refuses() -> bool:
        return await http_get(proxy_a.host_port[1]) == (0, b"")

    async def envoy_refuses() -> bool:
        return await http_get(inbound_port, client) == (0, b"")

    took = await eventually(proxy_refuses, "B's spiffe-proxy refusing A's client")
    took = max(took, await eventually(envoy_refuses, "B's inbound Envoy refusing A's client"))
    assert took < PROPAGATION_BOUND
    fetched_b = json.loads((await b.agent.aapi("fetch", "x509", "--output", "json")).stdout)
    assert fetched_b["federated_bundles"] == {}
    # A still federates with B: B's bundle is still served to A's workload.
    fetched_a = json.loads((await a.agent.aapi("fetch", "x509", "--output", "json")).stdout)
    assert set(fetched_a["federated_bundles"]) == {B}
