"""Twenty and more certificate rotations under continuous traffic, through two real ``spiffe-proxy``
processes that take their identities from a real agent.

Processes: ``spiffe-server`` (SQLite), ``spiffe-agent`` (join token; ``discover_workload_path``),
``spiffe-proxy --mode client`` and ``spiffe-proxy --mode server``, both with ``--workload-api``
against the agent. Traffic: test clients -> client-mode proxy -> mTLS -> server-mode proxy -> an
echo upstream in this test. The two proxies get different SPIFFE IDs although both are Python run
by the same user: each runs the console script through its own path to this interpreter
(:func:`tests.sidecar.proxy.processes.python_at`), and its entry selects that path
(``unix:path``). Each allows only the other's ID.

Both entries have an X.509 TTL of :data:`TTL` seconds. An SVID is backdated 10 s, so its
half-life falls before it was even issued, and the agent renews it as soon as it allows: one
second after it stored it. So each proxy gets a new SVID about every second, and the test runs
until the server-mode proxy has rotated :data:`ROTATIONS` times (``spiffe_proxy_identity_rotations``
on its ``/metrics``, cross-checked with the distinct expiry times its gauge showed).

Meanwhile: :data:`SHORT_WORKERS` clients open connection after connection (each one new mTLS
handshake between the proxies, with whichever SVIDs are current), and :data:`LONG_LIVED`
connections stay open from before the first rotation to after the last, exchanging messages all
along. Every echo is compared with what was sent. Not one connection may drop, not one request
may fail, and neither proxy may count a failed handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest

from tests.sidecar.proxy.processes import ProxyProcess, python_at, start_proxy
from tests.support.agent import AgentProcess, http_get, remove_socket_dir, running_agent, socket_dir, write_roots
from tests.support.server import ServerProcess, running_server

TD: Final = "spiffe://example.org"
NODE_ID: Final = f"{TD}/node/proxy-rotation"
SERVER_ID: Final = f"{TD}/legacy/server-proxy"
CLIENT_ID: Final = f"{TD}/legacy/client-proxy"
TTL: Final = 5
ROTATIONS: Final = 20
ROTATION_DEADLINE: Final = 90.0
SHORT_WORKERS: Final = 4
SHORT_PAUSE: Final = 0.02
LONG_LIVED: Final = 3
LONG_PAUSE: Final = 0.05
REQUEST_TIMEOUT: Final = 10.0
_METRIC: Final = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$", re.MULTILINE)
_LABEL: Final = re.compile(r'(?P<key>[a-z_]+)="(?P<value>[^"]*)"')


@dataclass(frozen=True)
class Metrics:
    """One scrape of a proxy's ``/metrics``."""

    samples: tuple[tuple[str, dict[str, str], float], ...]

    def __call__(self, name: str, **labels: str) -> float:
        """The sum of the series ``name`` whose labels include ``labels``."""
        return sum(
            value
            for found, have, value in self.samples
            if found == name and all(have.get(k) == v for k, v in labels.items())
        )


def metrics(status: str) -> Metrics:
    code, body = http_get(f"http://{status}/metrics")
    assert code == 200, body
    return Metrics(
        tuple(
            (m["name"], {lm["key"]: lm["value"] for lm in _LABEL.finditer(m["labels"] or "")}, float(m["value"]))
            for m in _METRIC.finditer(body)
        )
    )


class Echo:
    """The legacy service: echoes every byte, then ends after the client's FIN."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.connections = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class Traffic:
    """Short connections and long-lived ones through the client-mode proxy; every failure kept."""

    entry: tuple[str, int]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    requests: int = 0
    exchanges: int = 0
    long_open: int = 0
    failures: list[str] = field(default_factory=list)

    async def short(self, seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 - sizes, not secrets
        while not self.stop.is_set():
            payload = rng.randbytes(rng.randint(1, 64 * 1024))
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    reader, writer = await asyncio.open_connection(*self.entry)
                    writer.write(payload)
                    writer.write_eof()
                    got = await reader.read()
                    writer.close()
                    await writer.wait_closed()
            except (OSError, TimeoutError) as err:
                self.failures.append(f"request {self.requests + len(self.failures) + 1}: {err!r}")
            else:
                if got == payload:
                    self.requests += 1
                else:
                    self.failures.append(f"request echoed {len(got)} bytes of {len(payload)}, or other bytes")
            await asyncio.sleep(SHORT_PAUSE)

    async def long_lived(self, seed: int, opened: asyncio.Event) -> None:
        rng = random.Random(seed)  # noqa: S311
        try:
            reader, writer = await asyncio.open_connection(*self.entry)
            self.long_open += 1
            if self.long_open == LONG_LIVED:
                opened.set()
            while not self.stop.is_set():
                payload = rng.randbytes(rng.randint(1, 256 * 1024))
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    writer.write(payload)
                    await writer.drain()
                    got = await reader.readexactly(len(payload))
                if got != payload:
                    self.failures.append("a long-lived connection echoed other bytes")
                    return
                self.exchanges += 1
                await asyncio.sleep(LONG_PAUSE)
            writer.write_eof()
            async with asyncio.timeout(REQUEST_TIMEOUT):
                rest = await reader.read()
            writer.close()
            await writer.wait_closed()
            if rest:
                self.failures.append(f"a long-lived connection got {len(rest)} bytes it did not send")
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as err:
            self.failures.append(f"a long-lived connection dropped: {err!r}")
        finally:
            opened.set()  # never leave the test waiting


@dataclass
class Mesh:
    server: ServerProcess
    agent: AgentProcess
    pythons: dict[str, Path]


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    pythons = {name: python_at(tmp_path / f"python-{name}") for name in ("server", "client")}
    sockets = socket_dir("proxy-rotation")
    try:
        with running_server(tmp_path / "server") as server:

            def create(spiffe_id: str, name: str) -> None:
                server.cli_json(
                    "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", NODE_ID,
                    "--selector", f"unix:path:{pythons[name]}", "--x509-ttl", str(TTL),
                )  # fmt: skip

            with ThreadPoolExecutor() as pool:  # the admin commands at once: each starts a Python
                created = [pool.submit(create, SERVER_ID, "server"), pool.submit(create, CLIENT_ID, "client")]
                token = pool.submit(server.token, "--spiffe-id", NODE_ID)
                roots = pool.submit(write_roots, server, tmp_path / "roots.pem")
                for done in created:
                    done.result()
            config = tmp_path / "agent.yaml"
            config.write_text("workload_attestors:\n  unix:\n    discover_workload_path: true\n")
            with running_agent(
                tmp_path / "agent",
                server.address,
                socket_path=sockets / "api.sock",
                join_token=token.result(),
                trust_bundle=roots.result(),
                extra=["--config", str(config)],
            ) as agent:
                yield Mesh(server, agent, pythons)
    finally:
        remove_socket_dir(sockets)


@contextlib.asynccontextmanager
async def proxy(mesh: Mesh, logs: Path, mode: str, *argv: str) -> AsyncIterator[ProxyProcess]:
    """``spiffe-proxy`` run by the interpreter whose path selects ``mode``'s SPIFFE ID; stopped (exit 0) after."""
    command = ["--mode", mode, "--listen", "127.0.0.1:0", "--workload-api", mesh.agent.endpoint]
    command += ["--status", "127.0.0.1:0", *argv]
    running = await asyncio.to_thread(start_proxy, mesh.pythons[mode], command, logs=logs, name=f"spiffe-proxy {mode}")
    try:
        yield running
    finally:
        code = await asyncio.to_thread(running.stop)
        assert code == 0, running.stderr[-4000:]


async def test_twenty_rotations_under_continuous_traffic(mesh: Mesh, tmp_path: Path) -> None:
    echo = Echo()
    upstream = await echo.start()
    try:
        async with (
            proxy(mesh, tmp_path, "server", "--upstream", upstream, "--allow-id", CLIENT_ID) as inbound,
            proxy(mesh, tmp_path, "client", "--upstream", inbound.listen, "--allow-id", SERVER_ID) as outbound,
        ):
            assert (inbound.spiffe_id, outbound.spiffe_id) == (SERVER_ID, CLIENT_ID)
            traffic = Traffic(outbound.host_port)
            opened = asyncio.Event()
            tasks = [asyncio.create_task(traffic.long_lived(seed, opened)) for seed in range(LONG_LIVED)]
            await asyncio.wait_for(opened.wait(), REQUEST_TIMEOUT)
            at_open = await asyncio.to_thread(metrics, inbound.status)
            tasks += [asyncio.create_task(traffic.short(100 + seed)) for seed in range(SHORT_WORKERS)]

            expiries = {at_open("spiffe_proxy_certificate_expiry_timestamp_seconds")}
            began = time.monotonic()
            rotations = 0.0
            while rotations < ROTATIONS + at_open("spiffe_proxy_identity_rotations_total"):
                assert time.monotonic() - began < ROTATION_DEADLINE, (
                    f"{rotations:.0f} rotations in {ROTATION_DEADLINE:.0f} s\n{mesh.agent.stderr[-4000:]}"
                )
                assert not traffic.failures, traffic.failures[:5]
                await asyncio.sleep(0.2)
                now = await asyncio.to_thread(metrics, inbound.status)
                rotations = now("spiffe_proxy_identity_rotations_total")
                expiries.add(now("spiffe_proxy_certificate_expiry_timestamp_seconds"))
            seconds = time.monotonic() - began
            await asyncio.sleep(0.5)  # traffic on the last identity too
            traffic.stop.set()
            await asyncio.gather(*tasks)
            server_side = await asyncio.to_thread(metrics, inbound.status)
            client_side = await asyncio.to_thread(metrics, outbound.status)
            rotated_logs = {str(line["expires_at"]) for line in inbound.logged("identity rotated")}
    finally:
        await echo.close()

    assert traffic.failures == []
    assert traffic.long_open == LONG_LIVED  # opened before the first rotation counted, closed cleanly after
    assert traffic.exchanges > LONG_LIVED * ROTATIONS  # they kept talking all along
    assert traffic.requests > ROTATIONS * SHORT_WORKERS  # handshakes under many identities
    assert echo.connections == traffic.requests + LONG_LIVED
    rotated = server_side("spiffe_proxy_identity_rotations_total") - at_open("spiffe_proxy_identity_rotations_total")
    assert rotated >= ROTATIONS
    assert len(expiries) >= ROTATIONS + 1  # distinct SVIDs (issued >= 1 s apart: distinct notAfter seconds)
    assert len(rotated_logs) >= ROTATIONS  # "identity rotated" log lines, each with another expiry
    assert client_side("spiffe_proxy_identity_rotations_total") >= ROTATIONS - 2  # the same TTL: about as many
    for side in (server_side, client_side):
        assert side("spiffe_proxy_handshakes_total", result="ok") >= traffic.requests + LONG_LIVED
        assert side("spiffe_proxy_handshakes_total", result="failed") == 0
        assert side("spiffe_proxy_rejections_total") == 0
        assert side("spiffe_proxy_upstream_connect_failures_total") == 0
        assert side("spiffe_proxy_connections_active") == 0
    print(  # the measured figures, for the record (pytest -s)
        f"\n{rotated:.0f} rotations of the server-mode proxy in {seconds:.1f} s; {traffic.requests} requests on new "
        f"connections and {traffic.exchanges} exchanges on {LONG_LIVED} long-lived ones, 0 failed"
    )
