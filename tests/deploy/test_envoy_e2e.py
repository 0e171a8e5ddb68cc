"""The rendered bootstraps at work: real Envoys, certificates over SDS from the agent's servicer.

One SDS server (the agent's ``SecretDiscoveryService`` over an in-memory identity provider that
gives every caller the SVID ``spiffe://example.org/web``) feeds three Envoys rendered from the
templates: an inbound sidecar in front of an app that echoes the ``x-forwarded-client-cert``
header it receives, an outbound sidecar expecting the inbound's ID, and an outbound sidecar
expecting another ID. Ports are 0 (chosen by the kernel) and read back from the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
import urllib.error
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
import pytest
import yaml

from sidecar.sds.service import SecretDiscoveryService, add_to_server
from spiffecore import X509SVID
from spiffecore.tls import load_svid
from tests.deploy.support import ENVOY_DIR, load_renderer
from tests.sidecar.workload.support import CallerBox, FakeIdentities, StaticAttestor
from tests.support.ca import TestCA
from tests.support.envoy import EnvoyProcess, start_envoy
from tests.support.httpapp import HTTPApp

render = load_renderer()

WEB: Final = "spiffe://example.org/web"
OTHER: Final = "spiffe://example.org/backend"


async def http_get(port: int) -> tuple[int, bytes]:
    """One request to a plaintext port: the status code and body."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            await writer.drain()
            response = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def mtls_attempt(port: int, svid: X509SVID) -> bytes:
    """mTLS straight to the inbound Envoy with ``svid``; what came back (empty when refused)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the inbound's decision is under test
    load_svid(context, svid)
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            writer.write(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            await writer.drain()
            data = await reader.read()
            writer.close()
    except (ssl.SSLError, ConnectionError):
        return b""
    return data


def is_live(envoy: EnvoyProcess) -> bool:
    try:
        return envoy.get("/ready").strip() == "LIVE"
    except urllib.error.HTTPError:  # 503 while the SDS secrets are awaited
        return False


@dataclass
class Sidecars:
    identities: FakeIdentities
    workdir: Path
    socket: Path

    async def start(self, template: str, name: str, values: Mapping[str, str]) -> EnvoyProcess:
        text = render.render(
            (ENVOY_DIR / template).read_text(), {"AGENT_SOCKET": str(self.socket), "ADMIN_PORT": "0", **values}
        )
        envoy = await asyncio.to_thread(start_envoy, name, yaml.safe_load(text), self.workdir)
        try:
            await envoy.wait_for(is_live)
        except BaseException:
            envoy.stop()
            raise
        return envoy


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    directory = Path(f"/tmp/deploy-e2e-{os.getpid()}-{time.monotonic_ns()}")  # noqa: S108
    directory.mkdir()
    yield directory
    for child in directory.iterdir():
        child.unlink(missing_ok=True)
    directory.rmdir()


@pytest.fixture
async def sidecars(tmp_path: Path, short_dir: Path) -> AsyncIterator[Sidecars]:
    identities = FakeIdentities(TestCA.create("example.org"))
    identities.add_entry("/web")
    socket = short_dir / "agent.sock"
    server = grpc.aio.server()
    add_to_server(SecretDiscoveryService(identities, CallerBox(), StaticAttestor()), server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    try:
        yield Sidecars(identities=identities, workdir=tmp_path / "envoy", socket=socket)
    finally:
        await server.stop(None)


async def test_inbound_and_outbound_sidecars_end_to_end(sidecars: Sidecars) -> None:
    app = HTTPApp()
    app_port = await app.start()
    envoys: list[EnvoyProcess] = []
    try:
        inbound = await sidecars.start(
            "inbound.yaml.tmpl",
            "inbound",
            {"LISTEN_ADDRESS": "127.0.0.1", "LISTEN_PORT": "0", "APP_PORT": str(app_port), "ALLOWED_SPIFFE_IDS": WEB},
        )
        envoys.append(inbound)
        inbound_port = str(inbound.listener_port("inbound_mtls"))
        outbound = {"LISTEN_PORT": "0", "UPSTREAM_ADDRESS": "127.0.0.1", "UPSTREAM_PORT": inbound_port}
        good = await sidecars.start("outbound.yaml.tmpl", "outbound", {**outbound, "UPSTREAM_SPIFFE_ID": WEB})
        envoys.append(good)
        wrong = await sidecars.start("outbound.yaml.tmpl", "wrong", {**outbound, "UPSTREAM_SPIFFE_ID": OTHER})
        envoys.append(wrong)

        # Through both sidecars: the app sees the caller's SPIFFE ID, set by the inbound sidecar.
        status, body = await http_get(good.listener_port("outbound_http"))
        assert status == 200, body
        fields = dict(part.split("=", 1) for part in body.decode().split(";"))
        assert (fields["By"], fields["URI"]) == (WEB, WEB)
        assert len(fields["Hash"]) == 64

        # An upstream presenting another ID than the one expected is refused by the outbound sidecar.
        status, _ = await http_get(wrong.listener_port("outbound_http"))
        assert status == 503
        assert wrong.stats()["cluster.upstream.ssl.fail_verify_san"] >= 1  # one per attempt, retries included

        # A caller with a valid SVID of the trust domain, but not an allowed ID, is refused by the inbound.
        intruder = sidecars.identities.ca.mint("/intruder").svid()
        assert await mtls_attempt(int(inbound_port), intruder) == b""
        refused = {name: value for name, value in inbound.stats().items() if name.endswith(".ssl.fail_verify_san")}
        assert list(refused.values()) == [1], refused
        allowed = await mtls_attempt(int(inbound_port), sidecars.identities.entries[0].svid)
        assert allowed.startswith(b"HTTP/1.1 200 OK"), allowed
    finally:
        for envoy in envoys:
            envoy.stop()
        await app.close()
