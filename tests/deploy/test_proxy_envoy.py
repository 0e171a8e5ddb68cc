"""spiffe-proxy in front of and behind real Envoy sidecars, every certificate from one real agent.

Processes: ``spiffe-server``, ``spiffe-agent`` (join token, ``discover_workload_path``), Envoys
rendered from ``deploy/envoy/*.tmpl`` that take their SVIDs and bundle from the agent over SDS,
and ``spiffe-proxy`` processes that take theirs from the same agent's Workload API. Everything
runs as one user, so the agent tells the workloads apart by the path of their executable: each
Envoy runs through its own hard link to the Envoy binary, each proxy through its own path to this
Python (:func:`tests.sidecar.proxy.processes.python_at`), and each entry selects one path.

(a) A legacy client calls a mesh service: plaintext HTTP -> ``spiffe-proxy --mode client``
    (``LEGACY_CLIENT``, allows only ``WEB``) -> mTLS -> the inbound Envoy of ``WEB`` (allows only
    ``LEGACY_CLIENT``) -> the web app, which sees the proxy's SPIFFE ID in
    ``x-forwarded-client-cert``.
(b) A mesh service calls a legacy one: the frontend app -> the outbound Envoy of ``FRONTEND``
    (expects ``LEGACY_DB``) -> mTLS -> ``spiffe-proxy --mode server`` (``LEGACY_DB``, allows only
    ``FRONTEND``) -> the legacy plaintext service.

And the refusals, one per direction: a client-mode proxy holding a valid SVID of the trust domain
that the inbound Envoy does not allow (``LEGACY_DB``) gets no answer, and Envoy counts a SAN
verification failure; an outbound Envoy holding one that the server-mode proxy does not allow
(``WEB``) gets a 503, and the proxy logs the rejection with the caller's ID. Neither app sees a
request from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.error
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest
import yaml

from tests.deploy.support import ENVOY_DIR, load_renderer
from tests.sidecar.proxy.processes import ProxyProcess, python_at, start_proxy
from tests.support.agent import AgentProcess, remove_socket_dir, running_agent, socket_dir, write_roots
from tests.support.envoy import EnvoyProcess, linked_binary, start_envoy
from tests.support.httpapp import HTTPApp
from tests.support.server import ServerProcess, running_server

render = load_renderer()

TD: Final = "spiffe://example.org"
NODE_ID: Final = f"{TD}/node/proxy-envoy"
WEB: Final = f"{TD}/web"  # the inbound Envoy in front of the web app
FRONTEND: Final = f"{TD}/frontend"  # the outbound Envoy of the frontend app
LEGACY_CLIENT: Final = f"{TD}/legacy/client"  # the client-mode proxy of a legacy client
LEGACY_DB: Final = f"{TD}/legacy/db"  # the server-mode proxy in front of a legacy service
REQUEST_TIMEOUT: Final = 10.0
LEGACY_ANSWER: Final = b"hello from the legacy service"


async def http_get(host: str, port: int) -> bytes:
    """One plaintext HTTP request; the whole response (empty when the connection was cut)."""
    async with asyncio.timeout(REQUEST_TIMEOUT):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            await writer.drain()
            try:
                return await reader.read()
            except ConnectionResetError:
                return b""
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def status_and_body(response: bytes) -> tuple[int, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), response[:200]
    return int(head.split(b" ")[1]), body


def ssl_counter(envoy: EnvoyProcess, listener_prefix: str, counter: str) -> int:
    """A TLS counter of the listeners whose stat names start with ``listener_prefix``, summed."""
    return sum(
        int(value)
        for name, value in envoy.stats().items()
        if name.startswith(listener_prefix) and name.endswith(f".ssl.{counter}")
    )


def is_live(envoy: EnvoyProcess) -> bool:
    try:
        return envoy.get("/ready").strip() == "LIVE"
    except urllib.error.HTTPError:  # 503 while the SDS secrets are awaited
        return False


@dataclass
class Node:
    """A server and an agent; an Envoy link or a Python path per workload identity."""

    server: ServerProcess
    agent: AgentProcess
    workdir: Path
    envoys: dict[str, Path]
    pythons: dict[str, Path]
    started: list[EnvoyProcess | ProxyProcess] = field(default_factory=list)

    async def envoy(self, template: str, name: str, identity: str, values: Mapping[str, str]) -> EnvoyProcess:
        """An Envoy rendered from ``template``, run through ``identity``'s link, live with its SDS secrets."""
        text = render.render(
            (ENVOY_DIR / template).read_text(),
            {"AGENT_SOCKET": str(self.agent.socket), "ADMIN_PORT": "0", **values},
        )
        envoy = await asyncio.to_thread(
            start_envoy, name, yaml.safe_load(text), self.workdir / "envoy", executable=self.envoys[identity]
        )
        self.started.append(envoy)
        await envoy.wait_for(is_live, timeout=30.0)
        return envoy

    async def proxy(self, identity: str, *argv: str) -> ProxyProcess:
        """``spiffe-proxy`` with ``identity``'s SVID from the agent's Workload API."""
        command = ["--listen", "127.0.0.1:0", "--workload-api", self.agent.endpoint, *argv]
        started = await asyncio.to_thread(
            start_proxy, self.pythons[identity], command, logs=self.workdir, name=f"spiffe-proxy ({identity})"
        )
        self.started.append(started)
        assert started.spiffe_id == identity
        return started

    def stop(self) -> None:
        for process in reversed(self.started):
            if isinstance(process, ProxyProcess):
                assert process.stop() == 0, process.stderr[-4000:]
            else:
                process.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    envoys = {
        identity: linked_binary(tmp_path / "bin", name).resolve()
        for identity, name in ((WEB, "web-envoy"), (FRONTEND, "frontend-envoy"))
    }
    pythons = {
        identity: python_at(tmp_path / name)
        for identity, name in ((LEGACY_CLIENT, "client-python"), (LEGACY_DB, "db-python"))
    }
    sockets = socket_dir("proxy-envoy")
    try:
        with running_server(tmp_path / "server") as server:

            def create(spiffe_id: str, path: Path) -> None:
                server.cli_json(
                    "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", NODE_ID,
                    "--selector", f"unix:path:{path}",
                )  # fmt: skip

            with ThreadPoolExecutor() as pool:  # the admin commands at once: each starts a Python
                created = [pool.submit(create, spiffe_id, path) for spiffe_id, path in {**envoys, **pythons}.items()]
                token = pool.submit(server.token, "--spiffe-id", NODE_ID)
                roots = pool.submit(write_roots, server, tmp_path / "roots.pem")
                for done in created:
                    done.result()
            config = tmp_path / "agent.yaml"  # path selectors; never hash the 100 MB Envoy binary
            config.write_text(
                "workload_attestors:\n  unix:\n    discover_workload_path: true\n    workload_size_limit: -1\n"
            )
            with running_agent(
                tmp_path / "agent",
                server.address,
                socket_path=sockets / "api.sock",
                join_token=token.result(),
                trust_bundle=roots.result(),
                extra=["--config", str(config)],
            ) as agent:
                result = Node(server, agent, tmp_path, envoys, pythons)
                try:
                    yield result
                finally:
                    result.stop()
    finally:
        remove_socket_dir(sockets)


async def test_proxy_client_mode_to_envoy_inbound_and_envoy_outbound_to_proxy_server_mode(node: Node) -> None:
    web_app, legacy = HTTPApp(), HTTPApp(LEGACY_ANSWER)
    web_port, legacy_port = await web_app.start(), await legacy.start()
    try:
        inbound, db_proxy = await asyncio.gather(
            node.envoy(
                "inbound.yaml.tmpl",
                "web-inbound",
                WEB,
                {
                    "LISTEN_ADDRESS": "127.0.0.1",
                    "LISTEN_PORT": "0",
                    "APP_PORT": str(web_port),
                    "ALLOWED_SPIFFE_IDS": LEGACY_CLIENT,
                },
            ),
            node.proxy(LEGACY_DB, "--mode", "server", "--upstream", f"127.0.0.1:{legacy_port}", "--allow-id", FRONTEND),
        )
        inbound_port = str(inbound.listener_port("inbound_mtls"))
        _, db_port = db_proxy.host_port
        outbound_values = {"LISTEN_PORT": "0", "UPSTREAM_ADDRESS": "127.0.0.1", "UPSTREAM_PORT": str(db_port)}
        client_proxy, wrong_client, outbound, wrong_outbound = await asyncio.gather(
            node.proxy(LEGACY_CLIENT, "--mode", "client", "--upstream", f"127.0.0.1:{inbound_port}", "--allow-id", WEB),
            # A valid SVID of the trust domain that the inbound Envoy does not allow.
            node.proxy(LEGACY_DB, "--mode", "client", "--upstream", f"127.0.0.1:{inbound_port}", "--allow-id", WEB),
            node.envoy(
                "outbound.yaml.tmpl",
                "frontend-outbound",
                FRONTEND,
                {**outbound_values, "UPSTREAM_SPIFFE_ID": LEGACY_DB},
            ),
            # An Envoy with a valid SVID (WEB's) that the server-mode proxy does not allow.
            node.envoy("outbound.yaml.tmpl", "web-outbound", WEB, {**outbound_values, "UPSTREAM_SPIFFE_ID": LEGACY_DB}),
        )

        # (a) legacy client -> client-mode proxy -> Envoy inbound -> web app.
        for _ in range(3):
            status, body = status_and_body(await http_get(*client_proxy.host_port))
            assert status == 200, body
            fields = dict(part.split("=", 1) for part in body.decode().split(";"))
            assert (fields["By"], fields["URI"]) == (WEB, LEGACY_CLIENT)  # set by Envoy from the proxy's SVID
        assert web_app.requests == 3
        assert [line["spiffe_id"] for line in client_proxy.logged("upstream connected")] == [WEB] * 3

        # (a) refused: the inbound Envoy does not let LEGACY_DB in; the web app never hears of it.
        refused_before = ssl_counter(inbound, "listener.", "fail_verify_san")
        assert await http_get(*wrong_client.host_port) == b""
        await inbound.wait_for(lambda envoy: ssl_counter(envoy, "listener.", "fail_verify_san") > refused_before)
        assert ssl_counter(inbound, "listener.", "fail_verify_san") == refused_before + 1
        assert web_app.requests == 3

        # (b) frontend app -> Envoy outbound -> server-mode proxy -> legacy service.
        outbound_port = outbound.listener_port("outbound_http")
        for _ in range(3):
            status, body = status_and_body(await http_get("127.0.0.1", outbound_port))
            assert (status, body) == (200, LEGACY_ANSWER)
        assert legacy.requests == 3
        accepted = db_proxy.logged("connection accepted")
        assert {line["spiffe_id"] for line in accepted} == {FRONTEND}
        assert outbound.stats()["cluster.upstream.ssl.handshake"] >= 1

        # (b) refused: the server-mode proxy does not let WEB's Envoy in; Envoy answers 503.
        status, _ = status_and_body(await http_get("127.0.0.1", wrong_outbound.listener_port("outbound_http")))
        assert status == 503
        assert legacy.requests == 3
        rejected = await asyncio.to_thread(db_proxy.wait_logged, "connection rejected")
        assert {line["spiffe_id"] for line in rejected} == {WEB}
        assert {line["reason"] for line in rejected} == {
            f'authorize: "{WEB}" is not allowed: want one of IDs ["{FRONTEND}"]'
        }
    finally:
        await web_app.close()
        await legacy.close()
