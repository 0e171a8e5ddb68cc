"""Benchmark: Envoy SDS, push-to-live in one real Envoy and fan-out to 1,000 SDS streams.

Why these paths are hot: an SVID rotation or a bundle change is of no use until every Envoy on the
node runs with it. The agent pushes new secrets the moment its cache changes; how long Envoy then
takes to have them live bounds how stale a certificate can be, and a bundle change (a new CA
published) reaches every stream of the node at once, so its fan-out is the agent's worst burst.

What it measures, in one run:

- Push-to-live, one real Envoy (1.40, ``--concurrency 1``) subscribed to ``default`` and ``ROOTCA``
  over SDS on a unix socket, its listener's TLS context fed by them. The time runs from the trigger
  to the new leaf serial showing in Envoy's admin ``/certs``, which a separate poller process reads
  over one keep-alive connection every 1 ms (the measured gap between two reads, the granularity,
  is printed; a change is seen at most one gap late). Two sources, each rotated 50 times (15 with
  ``--quick``):

  * "servicer": the SDS servicer alone in this process (``SecretDiscoveryService`` over the
    in-memory identity provider of the tests, as ``tests/sidecar/sds/test_service.py`` serves it),
    triggered by swapping in a new SVID (signed before the clock starts, as the agent's cache
    receives it) and bumping the cache generation. This is the push itself: waking the stream,
    resolving, building and sending the secret, and Envoy applying it. The target applies here.
  * "agent": the full path with a real ``spiffe-server`` and ``spiffe-agent`` (processes), the
    Envoy attested by its uid through the agent's front door. The trigger is ``UpdateEntry``
    (a new X.509-SVID TTL, over the admin socket), so the control plane's watch, the agent's key
    generation, CSR and ``BatchNewX509SVID`` come first. A raw SDS stream this process holds on
    the agent (same uid, so the same entry) timestamps the push, splitting trigger-to-push from
    push-to-live. No target: it measures more than SDS.

- Fan-out: 1,000 ``StreamSecrets`` streams, each on its own connection (as 1,000 Envoys would
  hold them), opened from 4 client processes with raw gRPC and the xds-protos messages; each
  stream ACKs every response. The time runs from the trigger to each stream's receipt of the new
  version, measured in the client processes (``time.perf_counter`` is CLOCK_MONOTONIC, one clock
  for every process on the host); reported per stream (p50, p99, over every round) and to the
  last stream (the median over rounds, judged against the target, and the worst round). For the
  servicer, the time its last response was built and handed to gRPC is printed too: on a small
  machine the client processes' reading competes with the server for the same CPUs.

  * "servicer, bundle change": all 1,000 streams on ``ROOTCA``; the trigger publishes a second
    root in the trust domain's bundle (as a control-plane CA rotation does) and bumps the cache
    generation. A ``default`` stream carries only the SVID and gets nothing on a bundle change.
    The target applies here. The bundle of a real agent changes only when the control plane's
    CA prepares its next authority (at half its lifetime), which a benchmark cannot trigger.
  * "agent, SVID rotation": all 1,000 streams on ``default`` through the real agent (front door
    relay, per-call attestation), trigger ``UpdateEntry`` as above: every stream's secret
    changes. No target: signing comes first and the front door relays every byte.

Every process shares the machine's CPUs (the clients, Envoy, the agent, the server, the poller);
the host's load average at the start and the end is printed, as other work skews every number.
The clock is ``time.perf_counter``.

Run from the repository root: ``.venv/bin/python bench/sds.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2  # type: ignore[import-untyped]
from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped]
from envoy.service.secret.v3 import sds_pb2_grpc  # type: ignore[import-untyped]
from google.protobuf.message import Message

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Verdict, percentile, table
from sidecar.sds.resources import SECRET_TYPE_URL
from sidecar.sds.service import Context, SecretDiscoveryService, add_to_server
from spiffecore import X509Bundle
from spiffeproto import registration_pb2, registration_pb2_grpc
from tests.sidecar.workload.support import CallerBox, FakeIdentities, StaticAttestor
from tests.support.agent import AgentProcess, socket_dir, start_agent, write_roots
from tests.support.ca import TestCA
from tests.support.envoy import EnvoyProcess, envoy_binary, sds_cluster, sds_config, start_envoy
from tests.support.server import ServerProcess, start_server

TD: Final = "spiffe://example.org"
NODE: Final = f"{TD}/node/bench-sds"
ENVOY_ID: Final = f"{TD}/bench/envoy"
PUSH_P99_TARGET: Final = 0.050
FANOUT_TARGET: Final = 0.500
STREAMS: Final = 1000
CLIENT_PROCESSES: Final = 4
POLL_INTERVAL: Final = 0.001
SETTLE: Final = 0.05  # pause after each rotation, so the next starts from a quiet system
FANOUT_SETTLE: Final = 1.0
WAIT_TIMEOUT: Final = 20.0
DOWNSTREAM_TLS: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


@dataclass(frozen=True, slots=True, kw_only=True)
class Mode:
    rotations: int
    warmup: int
    fanout_rounds: int


FULL: Final = Mode(rotations=50, warmup=5, fanout_rounds=5)
QUICK: Final = Mode(rotations=15, warmup=3, fanout_rounds=1)


# --- helper processes --------------------------------------------------------------------------------

# Polls Envoy's /certs over one keep-alive connection every POLL seconds; prints a JSON line with the
# time and the leaf serials whenever they change, and the gaps between reads when stdin closes.
POLLER: Final = textwrap.dedent(
    """
    import http.client, json, sys, threading, time

    host, port = sys.argv[1].rsplit(":", 1)
    interval = float(sys.argv[2])
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    last = None
    gaps = []
    reads = []
    previous = time.perf_counter()
    while not stop.is_set():
        sent = time.perf_counter()
        connection.request("GET", "/certs")
        body = connection.getresponse().read()
        now = time.perf_counter()
        gaps.append(now - previous)
        reads.append(now - sent)
        previous = now
        contexts = json.loads(body).get("certificates", [])
        serials = sorted({int(c["serial_number"], 16) for ctx in contexts for c in ctx.get("cert_chain", [])})
        if serials != last:
            last = serials
            print(json.dumps({"t": now, "serials": serials}), flush=True)
        time.sleep(interval)
    print(json.dumps({"gaps": gaps, "reads": reads}), flush=True)
    """
)

# A fan-out client: opens `n` StreamSecrets streams for `name`, each on its own connection, ACKs every
# response, prints "ready" once every stream has its first response, then for each of `rounds` rounds
# a JSON list of the receipt times of the next response of every stream.
CLIENT: Final = textwrap.dedent(
    """
    import asyncio, json, sys, time
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from envoy.service.secret.v3 import sds_pb2_grpc

    TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    OPTIONS = [("grpc.use_local_subchannel_pool", 1)]

    async def stream(index, target, name, first, arrivals):
        node = base_pb2.Node(id=f"bench-{index}", cluster="bench")
        channel = grpc.aio.insecure_channel(target, options=OPTIONS)
        call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()
        await call.write(discovery_pb2.DiscoveryRequest(node=node, resource_names=[name], type_url=TYPE))
        count = 0
        async for response in call:
            now = time.perf_counter()
            assert len(response.resources) == 1, response
            await call.write(discovery_pb2.DiscoveryRequest(
                resource_names=[name], type_url=TYPE, version_info=response.version_info,
                response_nonce=response.nonce))
            count += 1
            if count == 1:
                first.put_nowait(None)
            else:
                arrivals.put_nowait(now)

    async def main(target, n, name, rounds):
        first = asyncio.Queue()
        arrivals = [asyncio.Queue() for _ in range(n)]
        tasks = [asyncio.create_task(stream(i, target, name, first, arrivals[i])) for i in range(n)]
        async with asyncio.timeout(120):
            for _ in range(n):
                await first.get()
        print("ready", flush=True)
        for _ in range(rounds):
            async with asyncio.timeout(60):
                times = await asyncio.gather(*(queue.get() for queue in arrivals))
            print(json.dumps(times), flush=True)
        for task in tasks:
            task.cancel()

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
    """
)


async def _python(program: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        program,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 24,
    )


async def _line(process: asyncio.subprocess.Process, timeout: float = WAIT_TIMEOUT) -> Any:
    assert process.stdout is not None
    assert process.stderr is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout)
    if not line:
        await process.wait()
        raise RuntimeError(f"a helper process ended early: {(await process.stderr.read()).decode()[-3000:]}")
    return json.loads(line)


class Poller:
    """The /certs poller process: each change of Envoy's leaf serials, with the time it was seen."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.serials: set[int] = set()

    @classmethod
    async def start(cls, envoy: EnvoyProcess) -> Poller:
        poller = cls(await _python(POLLER, envoy.admin, str(POLL_INTERVAL)))
        await poller.changed()
        return poller

    async def changed(self) -> float:
        """Wait for the next change; the time it was seen."""
        event = await _line(self.process)
        self.serials = set(event["serials"])
        seen: float = event["t"]
        return seen

    async def until(self, serial: int) -> float:
        """The time ``serial`` was first seen as Envoy's only leaf."""
        while True:
            seen = await self.changed()
            if self.serials == {serial}:
                return seen

    async def stop(self) -> tuple[list[float], list[float]]:
        """End it; the gaps between its reads and the duration of each read."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        while True:
            event = await _line(self.process)
            if "gaps" in event:
                await self.process.wait()
                return event["gaps"][1:], event["reads"]


# --- results -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    name: str
    samples: list[float]
    last: list[float] | None = None  # fan-out: per round, the time to the last stream
    sent_last: list[float] | None = None  # fan-out, servicer: per round, the time to its last send

    def p(self, which: int) -> float:
        return percentile(self.samples, which)


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    push_servicer: Latency
    push_agent: Latency
    trigger_to_push_agent: Latency
    push_to_live_agent: Latency
    fanout_servicer: Latency
    fanout_agent: Latency
    poll_gaps: list[float]
    poll_reads: list[float]
    load: tuple[float, float]  # the host's 1-minute load average when the run started and ended


# --- Envoy -----------------------------------------------------------------------------------------------


def bootstrap(sds_socket: Path) -> dict[str, Any]:
    """A listener whose TLS context takes ``default`` and ``ROOTCA`` over SDS; nothing connects to it."""
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DOWNSTREAM_TLS,
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds_config("sds")}],
                "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds_config("sds")},
            },
        },
    }
    blackhole = {
        "name": "blackhole",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "blackhole", "endpoints": []},
    }
    proxy = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "inbound",
            "cluster": "blackhole",
        },
    }
    return {
        "node": {"id": "bench-sidecar", "cluster": "bench"},
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [proxy], "transport_socket": tls}],
                }
            ],
            "clusters": [blackhole, sds_cluster("sds", sds_socket)],
        },
    }


@contextlib.asynccontextmanager
async def envoy_on(name: str, sds_socket: Path, workdir: Path) -> AsyncIterator[tuple[EnvoyProcess, Poller]]:
    """An Envoy on ``sds_socket`` with its secrets live, and a poller on its /certs."""
    envoy = await asyncio.to_thread(
        start_envoy, name, bootstrap(sds_socket), workdir, log_level="warning", component_log_level="secret:warning"
    )
    try:
        await envoy.wait_for(lambda e: len(e.serials()) == 1, timeout=WAIT_TIMEOUT)
        poller = await Poller.start(envoy)
        try:
            yield envoy, poller
        finally:
            if poller.process.returncode is None:
                poller.process.kill()
                await poller.process.wait()
        for stat in ("sds.default.update_rejected", "sds.ROOTCA.update_rejected"):
            if (await envoy.astats()).get(stat):
                raise RuntimeError(f"envoy rejected secrets ({stat})\n{envoy.describe()}")
    finally:
        envoy.stop()


# --- fan-out clients ----------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fanout_clients(socket: Path, name: str, rounds: int) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """:data:`STREAMS` streams on ``name`` from :data:`CLIENT_PROCESSES` processes, each with its first response."""
    per = STREAMS // CLIENT_PROCESSES
    clients = [await _python(CLIENT, f"unix:{socket}", str(per), name, str(rounds)) for _ in range(CLIENT_PROCESSES)]
    try:
        for client in clients:
            assert client.stdout is not None
            line = await asyncio.wait_for(client.stdout.readline(), 180)
            if line.strip() != b"ready":
                assert client.stderr is not None
                raise RuntimeError(f"a client did not get ready: {line!r} {(await client.stderr.read()).decode()}")
        await asyncio.sleep(FANOUT_SETTLE)  # the ACKs are in; the agent and server are idle
        yield clients
    finally:
        for client in clients:
            if client.returncode is None:
                client.kill()
                await client.wait()


async def fanout_round(clients: Sequence[asyncio.subprocess.Process], started: float) -> list[float]:
    """Every stream's delay from ``started`` to the new version."""
    arrivals = await asyncio.gather(*(_line(client, 60) for client in clients))
    return [at - started for times in arrivals for at in times]


# --- the servicer alone ---------------------------------------------------------------------------------------


class TimedService(SecretDiscoveryService):
    """The servicer, noting when each ``StreamSecrets`` response is built and handed to gRPC to send."""

    def __init__(self, identities: FakeIdentities) -> None:
        super().__init__(identities, CallerBox(), StaticAttestor())
        self.sent: list[float] = []

    async def StreamSecrets(  # noqa: N802 - gRPC method names
        self, request_iterator: AsyncIterable[Any], context: Context
    ) -> AsyncIterator[Message]:
        async for response in super().StreamSecrets(request_iterator, context):
            self.sent.append(time.perf_counter())
            yield response


async def servicer_phase(mode: Mode, workdir: Path, sockets: Path) -> tuple[Latency, Latency, list[float], list[float]]:
    ca = TestCA.create("example.org")
    identities = FakeIdentities(ca)
    identities.add_entry("/bench/envoy")
    sds_socket = sockets / "sds.sock"
    server = grpc.aio.server(options=[("grpc.max_pending_requests", 100_000)])
    service = TimedService(identities)
    add_to_server(service, server)
    server.add_insecure_port(f"unix:{sds_socket}")
    await server.start()
    try:
        push: list[float] = []
        async with envoy_on("servicer", sds_socket, workdir) as (_, poller):
            for index in range(mode.warmup + mode.rotations):
                entry = identities.entries[0]
                svid = ca.mint(entry.path).svid()  # signed before the clock starts, as the agent's cache gets it
                started = time.perf_counter()
                entry.svid = svid
                identities.bump()
                seen = await poller.until(svid.leaf.serial_number)
                if index >= mode.warmup:
                    push.append(seen - started)
                await asyncio.sleep(SETTLE)
            gaps, reads = await poller.stop()
        fanout: list[float] = []
        last: list[float] = []
        sent_last: list[float] = []
        async with fanout_clients(sds_socket, "ROOTCA", mode.fanout_rounds) as clients:
            for _ in range(mode.fanout_rounds):
                # The trust domain's root and its next one, as the control plane publishes them.
                roots = (*ca.x509_bundle().authorities, *TestCA.create("example.org").x509_bundle().authorities)
                service.sent.clear()
                started = time.perf_counter()
                identities.x509_bundle = X509Bundle(trust_domain=ca.trust_domain, authorities=roots)
                identities.bump()
                delays = await fanout_round(clients, started)
                fanout += delays
                last.append(max(delays))
                if len(service.sent) != STREAMS:
                    raise RuntimeError(f"the servicer sent {len(service.sent)} responses, not {STREAMS}")
                sent_last.append(max(service.sent) - started)
                await asyncio.sleep(FANOUT_SETTLE)
    finally:
        await server.stop(None)
    return (
        Latency(name="servicer: SVID rotated -> live in Envoy /certs", samples=push),
        Latency(
            name=f"servicer: bundle change -> {STREAMS:,} ROOTCA streams",
            samples=fanout,
            last=last,
            sent_last=sent_last,
        ),
        gaps,
        reads,
    )


# --- the real agent ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def real_agent(directory: Path, sockets: Path) -> Iterator[tuple[ServerProcess, AgentProcess, str]]:
    """A server and an agent; the entry (selected by this uid: Envoy and this process) and its id."""
    server = start_server(directory / "server", extra=["--log-level", "warning"])
    agent: AgentProcess | None = None
    try:
        token = server.token("--spiffe-id", NODE)
        entry = server.cli_json(
            "entry", "create", "--spiffe-id", ENVOY_ID, "--parent-id", NODE, "--selector", f"unix:uid:{os.getuid()}"
        )
        agent = start_agent(
            directory / "agent",
            server.address,
            socket_path=sockets / "api.sock",
            join_token=token,
            trust_bundle=write_roots(server, directory / "roots.pem"),
            extra=["--log-level", "warning"],
        )
        yield server, agent, str(entry["id"])
    finally:
        if agent is not None:
            agent.stop(prompt=15.0)
        server.stop(prompt=10.0)


class Rotator:
    """Forces a new SVID for the entry by changing its X.509-SVID TTL (registration API)."""

    def __init__(self, server: ServerProcess, entry_id: str) -> None:
        self._channel = grpc.aio.insecure_channel(f"unix:{server.admin_socket}")
        self._stub = registration_pb2_grpc.RegistrationAPIStub(self._channel)
        self._entry_id = entry_id
        self._ttl = 3600

    async def rotate(self) -> None:
        entry = await self._stub.GetEntry(registration_pb2.GetEntryRequest(id=self._entry_id), timeout=10)
        self._ttl += 1
        entry.x509_svid_ttl = self._ttl
        await self._stub.UpdateEntry(registration_pb2.UpdateEntryRequest(entry=entry), timeout=10)

    async def close(self) -> None:
        await self._channel.close(None)


@contextlib.asynccontextmanager
async def raw_sds(socket: Path) -> AsyncIterator[asyncio.Queue[tuple[float, int]]]:
    """This process's own ``default`` stream on the agent: each push's arrival time and leaf serial."""
    queue: asyncio.Queue[tuple[float, int]] = asyncio.Queue()
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()

        async def pump() -> None:
            await call.write(discovery_pb2.DiscoveryRequest(resource_names=["default"], type_url=SECRET_TYPE_URL))
            async for response in call:
                now = time.perf_counter()
                secret = secret_pb2.Secret()
                response.resources[0].Unpack(secret)
                leaf = x509.load_pem_x509_certificate(secret.tls_certificate.certificate_chain.inline_bytes)
                queue.put_nowait((now, leaf.serial_number))
                await call.write(
                    discovery_pb2.DiscoveryRequest(
                        resource_names=["default"],
                        type_url=SECRET_TYPE_URL,
                        version_info=response.version_info,
                        response_nonce=response.nonce,
                    )
                )

        task = asyncio.create_task(pump())
        try:
            yield queue
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def agent_phase(mode: Mode, workdir: Path, sockets: Path) -> tuple[Latency, Latency, Latency, Latency]:
    with real_agent(workdir, sockets) as (server, agent, entry_id):
        rotator = Rotator(server, entry_id)
        try:
            live: list[float] = []
            pushed: list[float] = []
            push_to_live: list[float] = []
            async with raw_sds(agent.socket) as pushes, envoy_on("agent", agent.socket, workdir) as (_, poller):
                await asyncio.wait_for(pushes.get(), WAIT_TIMEOUT)
                for index in range(mode.warmup + mode.rotations):
                    started = time.perf_counter()
                    await rotator.rotate()
                    push_at, serial = await asyncio.wait_for(pushes.get(), WAIT_TIMEOUT)
                    seen = await asyncio.wait_for(poller.until(serial), WAIT_TIMEOUT)
                    if index >= mode.warmup:
                        live.append(seen - started)
                        pushed.append(push_at - started)
                        push_to_live.append(seen - push_at)
                    await asyncio.sleep(SETTLE)
                await poller.stop()
            fanout: list[float] = []
            last: list[float] = []
            async with fanout_clients(agent.socket, "default", mode.fanout_rounds) as clients:
                for _ in range(mode.fanout_rounds):
                    started = time.perf_counter()
                    await rotator.rotate()
                    delays = await fanout_round(clients, started)
                    fanout += delays
                    last.append(max(delays))
                    await asyncio.sleep(FANOUT_SETTLE)
        finally:
            await rotator.close()
    return (
        Latency(name="agent: UpdateEntry -> live in Envoy /certs", samples=live),
        Latency(name="agent: UpdateEntry -> pushed (raw SDS stream)", samples=pushed),
        Latency(name="agent: pushed -> live in Envoy /certs", samples=push_to_live),
        Latency(name=f"agent: UpdateEntry -> {STREAMS:,} default streams", samples=fanout, last=last),
    )


async def run(mode: Mode) -> Report:
    load = os.getloadavg()[0]
    sockets = socket_dir("bench-sds")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sds-") as tmp:
            workdir = Path(tmp)
            push_servicer, fanout_servicer, gaps, reads = await servicer_phase(mode, workdir / "servicer", sockets)
            live, pushed, push_to_live, fanout_agent = await agent_phase(mode, workdir / "agent", sockets)
    finally:
        for child in sockets.iterdir():
            child.unlink(missing_ok=True)
        sockets.rmdir()
    return Report(
        push_servicer=push_servicer,
        push_agent=live,
        trigger_to_push_agent=pushed,
        push_to_live_agent=push_to_live,
        fanout_servicer=fanout_servicer,
        fanout_agent=fanout_agent,
        poll_gaps=gaps,
        poll_reads=reads,
        load=(load, os.getloadavg()[0]),
    )


# --- output --------------------------------------------------------------------------------------------------


def verdicts(report: Report) -> list[Verdict]:
    push = report.push_servicer.p(99)
    rounds = report.fanout_servicer.last or [max(report.fanout_servicer.samples)]
    fanout = statistics.median(rounds)
    return [
        Verdict(
            key="push_to_live",
            met=push < PUSH_P99_TARGET,
            text=f"p99 < {PUSH_P99_TARGET * 1000:.0f} ms for one Envoy (servicer): p99 {push * 1000:.1f} ms",
        ),
        Verdict(
            key="fanout_1000",
            met=fanout < FANOUT_TARGET,
            text=f"last of {STREAMS:,} streams < {FANOUT_TARGET * 1000:.0f} ms after a bundle change (servicer): "
            f"median of {len(rounds)} round(s) {fanout * 1000:.1f} ms (worst {max(rounds) * 1000:.1f} ms)",
        ),
    ]


def _environment(report: Report, mode: Mode) -> dict[str, Any]:
    found = re.search(
        r"/(\d+\.\d+\.\d+)/",
        subprocess.run(  # noqa: S603 - the Envoy binary the tests use
            [str(envoy_binary()), "--version"], capture_output=True, text=True, check=False
        ).stdout,
    )
    version = found[1] if found else ""
    return {
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "envoy": version or "unknown",
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs shared by all processes",
        "load": f"1-minute load average {report.load[0]:.2f} at the start, {report.load[1]:.2f} at the end "
        "(other work on the host shows here)",
        "clock": "time.perf_counter (CLOCK_MONOTONIC, shared by the processes)",
        "mode": f"{mode.rotations} rotations per source (after {mode.warmup} warm-up), "
        f"{mode.fanout_rounds} fan-out round(s) of {STREAMS:,} streams from {CLIENT_PROCESSES} processes",
    }


def _latencies(report: Report) -> list[tuple[str, Latency]]:
    return [
        ("push_servicer", report.push_servicer),
        ("push_agent", report.push_agent),
        ("trigger_to_push_agent", report.trigger_to_push_agent),
        ("push_to_live_agent", report.push_to_live_agent),
        ("fanout_servicer", report.fanout_servicer),
        ("fanout_agent", report.fanout_agent),
    ]


def _row(latency: Latency) -> tuple[str, ...]:
    last = "" if latency.last is None else f"{statistics.median(latency.last) * 1000:.1f}"
    return (
        latency.name,
        str(len(latency.samples)),
        *(f"{latency.p(which) * 1000:.1f}" for which in (50, 90, 99)),
        f"{max(latency.samples) * 1000:.1f}",
        last,
    )


def render_text(report: Report, mode: Mode) -> str:
    sent_last = report.fanout_servicer.sent_last or [0.0]
    header = ("case", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "last ms")
    lines = [
        "spiffe-sidecar SDS benchmark",
        *(f"  {key}: {value}" for key, value in _environment(report, mode).items()),
        "",
        "Push-to-live, one Envoy: trigger -> new leaf serial in Envoy's /certs",
        *table([header, *(_row(latency) for _, latency in _latencies(report)[:4])]),
        f"  (/certs read every {POLL_INTERVAL * 1000:g} ms + the read: gap between reads p50 "
        f"{percentile(report.poll_gaps, 50) * 1000:.2f} ms, p99 {percentile(report.poll_gaps, 99) * 1000:.2f} ms; "
        f"a read takes p50 {percentile(report.poll_reads, 50) * 1000:.2f} ms)",
        "",
        f"Fan-out: trigger -> new version on each of {STREAMS:,} StreamSecrets streams, received in the client "
        "processes (percentiles over every stream of every round; last = the round's last stream, median of rounds)",
        *table([header, *(_row(latency) for _, latency in _latencies(report)[4:])]),
        f"  (servicer: its last response built and handed to gRPC {statistics.median(sent_last) * 1000:.1f} ms after "
        f"the trigger, median of rounds; then gRPC's writes and the {CLIENT_PROCESSES} client processes' reads, "
        "on the same CPUs)",
        "",
    ]
    for verdict in verdicts(report):
        lines.append(f"{verdict.key}: target {verdict.text}: {'MET' if verdict.met else 'NOT MET'}")
    lines.append(
        f"full path (real server and agent): no target; push-to-live p99 {report.push_to_live_agent.p(99) * 1000:.1f} "
        f"ms, UpdateEntry to live p99 {report.push_agent.p(99) * 1000:.1f} ms, to the last of {STREAMS:,} "
        f"streams {statistics.median(report.fanout_agent.last or [0.0]) * 1000:.1f} ms (median of rounds)"
    )
    return "\n".join(lines)


def render_json(report: Report, mode: Mode) -> str:
    document = {
        "environment": _environment(report, mode),
        "latency": {
            key: {
                "name": latency.name,
                "n": len(latency.samples),
                **{f"p{which}_ms": round(latency.p(which) * 1000, 2) for which in (50, 90, 99)},
                "max_ms": round(max(latency.samples) * 1000, 2),
                **({} if latency.last is None else {"last_per_round_ms": [round(s * 1000, 2) for s in latency.last]}),
                **(
                    {}
                    if latency.sent_last is None
                    else {"server_sent_last_per_round_ms": [round(s * 1000, 2) for s in latency.sent_last]}
                ),
            }
            for key, latency in _latencies(report)
        },
        "poll": {
            "interval_ms": POLL_INTERVAL * 1000,
            "gap_p50_ms": round(percentile(report.poll_gaps, 50) * 1000, 3),
            "gap_p99_ms": round(percentile(report.poll_gaps, 99) * 1000, 3),
            "read_p50_ms": round(percentile(report.poll_reads, 50) * 1000, 3),
        },
        "verdicts": {verdict.key: {"met": verdict.met, "text": verdict.text} for verdict in verdicts(report)},
    }
    return json.dumps(document, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Envoy SDS: push-to-live latency in one real Envoy (admin /certs) from the SDS servicer alone and "
            f"through a real server and agent, and fan-out to {STREAMS:,} SDS streams after a change. Targets: "
            f"p99 < {PUSH_P99_TARGET * 1000:.0f} ms for one Envoy, < {FANOUT_TARGET * 1000:.0f} ms to the last "
            f"of {STREAMS:,} streams."
        )
    )
    parser.add_argument("--quick", action="store_true", help="fewer rotations and one fan-out round")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the tables")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    report = asyncio.run(run(mode))
    print(render_json(report, mode) if args.json else render_text(report, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
