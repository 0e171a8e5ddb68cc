"""Benchmark: the node agent's hot paths, with a real spiffe-server, a real spiffe-agent and workload processes.

Why these paths are hot: every workload asks the agent for its X.509-SVID when it starts, and a
node's workloads often start together (a deploy, a node reboot), so the first answer to
``FetchX509SVID`` — through the front door, SO_PEERCRED attestation, the cache and the response
build — is what each of them waits for, alone or with hundreds of others; an entry an operator
creates is of no use until the workload's stream delivers the SVID for it (server watch, agent
signing, stream push); and the agent holds every SVID of its node in memory.

What it measures, in one run (one server, one agent; both are processes of their own):

- First response: the time from starting ``FetchX509SVID`` on a new connection to its first message
  (one new gRPC channel per call, so the front door's accept and the workload attestation are in),
  measured inside client processes. "1 workload": one call at a time, repeated. "500 concurrent":
  500 streams opened at once, each on its own connection, from 4 client processes (125 each),
  released together; every stream's latency counts. All clients run as this benchmark's uid
  (one entry matches them all).
- Entry to SVID: the time from just before ``CreateEntry`` (registration API over the admin socket,
  a gRPC client in this process, so no CLI start-up is in it) to the arrival, on a workload stream
  this process holds open (our ``WorkloadAPIClient``), of the response carrying the new entry's SVID.
  That spans the server's store write and entry watch, the agent's key generation, CSR and
  ``BatchNewX509SVID``, and the push to the stream. Each entry is deleted again (and its removal
  awaited) before the next, so every response carries the same number of SVIDs.
- Memory: the agent's RSS (``VmRSS`` of ``/proc/<pid>/status``) before and after it caches 10,000
  workload SVIDs: 10,000 entries parented by the agent, created through the registration API with
  64 calls in flight; each has a selector of its own (``unix:uid:<n>``) so that no workload's
  response carries all of them. The set-up time (creating, then the agent signing all) is reported.

Target: p99 < 250 ms for first responses and for entry-to-SVID. The clock is ``time.perf_counter``.

Run from the repository root: ``.venv/bin/python bench/agent.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Verdict, percentile, table
from sidecar.workload.client import WorkloadAPIClient
from spiffeproto import registration_pb2, registration_pb2_grpc, types_pb2
from tests.support.agent import AgentProcess, free_port, socket_dir, start_agent, write_roots
from tests.support.server import ServerProcess, start_server

TD: Final = "spiffe://example.org"
NODE: Final = f"{TD}/node/bench"
SELF_ID: Final = f"{TD}/bench/workload"
P99_TARGET: Final = 0.250
CONCURRENT: Final = 500
CLIENT_PROCESSES: Final = 4
CREATE_IN_FLIGHT: Final = 64
DELIVERY_TIMEOUT: Final = 10.0
MiB: Final = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Mode:
    sequential: int
    concurrent_rounds: int
    creations: int
    cached: int


FULL: Final = Mode(sequential=300, concurrent_rounds=3, creations=100, cached=10_000)
QUICK: Final = Mode(sequential=60, concurrent_rounds=1, creations=30, cached=10_000)

# A workload client process: opens `n` channels (one connection each), says "ready", waits for "go"
# on stdin, starts FetchX509SVID on all at once and prints each stream's first-response latency.
# With "sequential" it makes `n` calls one after the other, each on a new channel.
CLIENT: Final = textwrap.dedent(
    """
    import asyncio, json, sys, time
    import grpc

    METHOD = "/SpiffeWorkloadAPI/FetchX509SVID"
    HEADER = (("workload.spiffe.io", "true"),)
    OPTIONS = [("grpc.use_local_subchannel_pool", 1)]

    async def first_response(channel):
        started = time.perf_counter()
        call = channel.unary_stream(METHOD)(b"", metadata=HEADER, timeout=60)
        message = await call.read()
        elapsed = time.perf_counter() - started
        assert message is not grpc.aio.EOF and message, "no X509SVIDResponse"
        call.cancel()
        return elapsed

    async def main(target, n, mode):
        if mode == "sequential":
            latencies = []
            for _ in range(n):
                async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
                    latencies.append(await first_response(channel))
        else:
            channels = [grpc.aio.insecure_channel(target, options=OPTIONS) for _ in range(n)]
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            latencies = await asyncio.gather(*(first_response(channel) for channel in channels))
            for channel in channels:
                await channel.close(None)
        print(json.dumps(latencies), flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
    """
)


# --- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    name: str
    samples: list[float]

    def p(self, which: int) -> float:
        return percentile(self.samples, which)


@dataclass(frozen=True, slots=True, kw_only=True)
class Memory:
    svids: int
    rss_before: int
    rss_after: int
    create_seconds: float
    signed_seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    one: Latency
    concurrent: Latency
    delivery: Latency
    acknowledged: list[float]
    memory: Memory
    agent_cpu_per_stream: float


# --- the system under test -------------------------------------------------------------------------


def _stub(server: ServerProcess) -> tuple[grpc.aio.Channel, registration_pb2_grpc.RegistrationAPIAsyncStub]:
    channel = grpc.aio.insecure_channel(f"unix:{server.admin_socket}")
    return channel, registration_pb2_grpc.RegistrationAPIStub(channel)


def _entry(spiffe_id: str, selector: str) -> types_pb2.Entry:
    kind, _, value = selector.partition(":")
    return types_pb2.Entry(spiffe_id=spiffe_id, parent_id=NODE, selectors=[types_pb2.Selector(type=kind, value=value)])


@contextlib.contextmanager
def _system(directory: Path) -> Any:
    server = start_server(directory / "server", extra=["--bind", "127.0.0.1:0"])
    sockets = socket_dir("spiffe-agent-bench")
    agent: AgentProcess | None = None
    try:
        token = server.token("--spiffe-id", NODE)
        server.cli(
            "entry", "create", "--spiffe-id", SELF_ID, "--parent-id", NODE, "--selector", f"unix:uid:{os.getuid()}"
        )
        agent = start_agent(
            directory / "agent",
            server.address,
            socket_path=sockets / "api.sock",
            join_token=token,
            trust_bundle=write_roots(server, directory / "roots.pem"),
            status=f"127.0.0.1:{free_port()}",
            extra=["--log-level", "warning"],
        )
        yield server, agent
    finally:
        if agent is not None:
            agent.stop(prompt=10.0)
        server.stop(prompt=10.0)
        with contextlib.suppress(OSError):
            (sockets).rmdir()


def cpu_seconds(agent: AgentProcess) -> float:
    """User plus system CPU time of the agent process so far, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{agent.process.pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def svid_count(agent: AgentProcess) -> int:
    with urllib.request.urlopen(agent.status_url("/metrics"), timeout=5) as response:  # noqa: S310 - local URL
        for line in response.read().decode().splitlines():
            if line.startswith("spiffe_agent_svids "):
                return int(float(line.split()[1]))
    raise RuntimeError("no spiffe_agent_svids in the agent's /metrics")


async def wait_svids(agent: AgentProcess, count: int, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while (seen := await asyncio.to_thread(svid_count, agent)) < count:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"the agent holds {seen} SVIDs, not {count}, after {timeout:g} s")
        await asyncio.sleep(0.05)


# --- first responses ---------------------------------------------------------------------------------


async def _client(agent: AgentProcess, n: int, mode: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        f"unix:{agent.socket}",
        str(n),
        mode,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _result(process: asyncio.subprocess.Process) -> list[float]:
    assert process.stdout is not None
    assert process.stderr is not None
    line = await asyncio.wait_for(process.stdout.readline(), 120)
    if not line:
        await process.wait()
        raise RuntimeError(f"a client failed: {(await process.stderr.read()).decode()}")
    await process.wait()
    latencies: list[float] = json.loads(line)
    return latencies


async def sequential(agent: AgentProcess, n: int) -> list[float]:
    return await _result(await _client(agent, n, "sequential"))


async def concurrent(agent: AgentProcess, total: int, processes: int) -> list[float]:
    clients = [await _client(agent, total // processes, "concurrent") for _ in range(processes)]
    for client in clients:
        assert client.stdout is not None
        line = await asyncio.wait_for(client.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"a client did not get ready: {line!r}")
    for client in clients:
        assert client.stdin is not None
        client.stdin.write(b"go\n")
        await client.stdin.drain()
    results = await asyncio.gather(*(_result(client) for client in clients))
    return [latency for result in results for latency in result]


# --- entry to SVID ---------------------------------------------------------------------------------------


Arrival = tuple[float, frozenset[str]]


@contextlib.asynccontextmanager
async def watching(agent: AgentProcess) -> AsyncIterator[asyncio.Queue[Arrival]]:
    """This process's workload stream, each response's SPIFFE IDs with its arrival time."""
    queue: asyncio.Queue[Arrival] = asyncio.Queue()
    async with WorkloadAPIClient(agent.endpoint) as client:

        async def pump() -> None:
            async for context in client.watch_x509_context():
                queue.put_nowait((time.perf_counter(), frozenset(str(svid.id) for svid in context.svids)))

        task = asyncio.create_task(pump())
        try:
            yield queue
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def until(queue: asyncio.Queue[Arrival], present: str, *, wanted: bool) -> float:
    async with asyncio.timeout(DELIVERY_TIMEOUT):
        while True:
            at, ids = await queue.get()
            if (present in ids) == wanted:
                return at


async def entry_to_svid(server: ServerProcess, agent: AgentProcess, count: int) -> tuple[list[float], list[float]]:
    channel, stub = _stub(server)
    delivered: list[float] = []
    acknowledged: list[float] = []
    try:
        async with watching(agent) as queue:
            await until(queue, SELF_ID, wanted=True)
            for index in range(count):
                spiffe_id = f"{TD}/bench/new/{index}"
                started = time.perf_counter()
                entry = await stub.CreateEntry(
                    registration_pb2.CreateEntryRequest(entry=_entry(spiffe_id, f"unix:uid:{os.getuid()}")), timeout=10
                )
                acknowledged.append(time.perf_counter() - started)
                delivered.append(await until(queue, spiffe_id, wanted=True) - started)
                await stub.DeleteEntry(registration_pb2.DeleteEntryRequest(id=entry.id), timeout=10)
                await until(queue, spiffe_id, wanted=False)
    finally:
        await channel.close(None)
    return delivered, acknowledged


# --- memory ------------------------------------------------------------------------------------------------


async def cache_many(server: ServerProcess, agent: AgentProcess, count: int) -> Memory:
    before = agent.rss_bytes()
    base = await asyncio.to_thread(svid_count, agent)
    channel, stub = _stub(server)
    started = time.perf_counter()
    try:
        pending = iter(range(count))

        async def worker() -> None:
            for index in pending:
                request = registration_pb2.CreateEntryRequest(
                    entry=_entry(f"{TD}/bench/cached/{index}", f"unix:uid:{1_000_000 + index}")
                )
                await stub.CreateEntry(request, timeout=60)

        async with asyncio.TaskGroup() as group:
            for _ in range(CREATE_IN_FLIGHT):
                group.create_task(worker())
        created = time.perf_counter() - started
        await wait_svids(agent, base + count, timeout=600)
        signed = time.perf_counter() - started
    finally:
        await channel.close(None)
    await asyncio.sleep(1.0)  # let the agent settle (freed buffers, finished responses)
    return Memory(
        svids=count, rss_before=before, rss_after=agent.rss_bytes(), create_seconds=created, signed_seconds=signed
    )


# --- the run -------------------------------------------------------------------------------------------------


async def run(mode: Mode) -> Report:
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp, _system(Path(tmp)) as (server, agent):
        await wait_svids(agent, 1, timeout=30)
        await sequential(agent, 10)  # warm-up: imports, first connections
        one = await sequential(agent, mode.sequential)
        many: list[float] = []
        cpu_before = cpu_seconds(agent)
        for _ in range(mode.concurrent_rounds):
            many += await concurrent(agent, CONCURRENT, CLIENT_PROCESSES)
        agent_cpu_per_stream = (cpu_seconds(agent) - cpu_before) / (CONCURRENT * mode.concurrent_rounds)
        delivered, acknowledged = await entry_to_svid(server, agent, mode.creations)
        memory = await cache_many(server, agent, mode.cached)
    return Report(
        one=Latency(name="FetchX509SVID first response, 1 workload", samples=one),
        concurrent=Latency(name=f"FetchX509SVID first response, {CONCURRENT} concurrent", samples=many),
        delivery=Latency(name="entry created -> SVID on the workload's stream", samples=delivered),
        acknowledged=acknowledged,
        memory=memory,
        agent_cpu_per_stream=agent_cpu_per_stream,
    )


# --- output ----------------------------------------------------------------------------------------------------


def verdicts(report: Report) -> list[Verdict]:
    return [
        Verdict(
            key=key,
            met=latency.p(99) < P99_TARGET,
            text=f"p99 < {P99_TARGET * 1000:.0f} ms ({latency.p(99) * 1000:.1f} ms)",
        )
        for key, latency in (("first_response_1", report.one), ("first_response_500", report.concurrent),
                             ("entry_to_svid", report.delivery))
    ]  # fmt: skip


def _environment(mode: Mode) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs shared by all processes",
        "clock": "time.perf_counter (wall)",
        "mode": f"{mode.sequential} sequential calls, {mode.concurrent_rounds} round(s) of {CONCURRENT} streams, "
        f"{mode.creations} entries, {mode.cached:,} cached SVIDs",
    }


def render_text(report: Report, mode: Mode) -> str:
    lines = [f"{key}: {value}" for key, value in _environment(mode).items()]
    rows: list[tuple[str, ...]] = [("case", "n", "p50 ms", "p90 ms", "p99 ms", "max ms")]
    for latency in (report.one, report.concurrent, report.delivery):
        rows.append(
            (
                latency.name,
                str(len(latency.samples)),
                *(f"{latency.p(which) * 1000:.1f}" for which in (50, 90, 99)),
                f"{max(latency.samples) * 1000:.1f}",
            )
        )
    memory = report.memory
    lines += [
        "",
        "Latency (first responses measured in the client processes; entry-to-SVID in this process)",
        *table(rows),
        f"  (agent CPU per concurrent stream, connection to first response: "
        f"{report.agent_cpu_per_stream * 1000:.2f} ms; CreateEntry acknowledged: "
        f"p50 {percentile(report.acknowledged, 50) * 1000:.1f} ms)",
        "",
        "Agent memory (RSS from /proc)",
        *table(
            [
                ("cached SVIDs", "RSS before MiB", "RSS after MiB", "KiB per SVID", "set-up s (create / all signed)"),
                (
                    f"{memory.svids:,}",
                    f"{memory.rss_before / MiB:.1f}",
                    f"{memory.rss_after / MiB:.1f}",
                    f"{(memory.rss_after - memory.rss_before) / memory.svids / 1024:.1f}",
                    f"{memory.create_seconds:.1f} / {memory.signed_seconds:.1f}",
                ),
            ]
        ),
        f"  (set-up: {memory.svids:,} CreateEntry calls, {CREATE_IN_FLIGHT} in flight, over the admin socket; "
        "then until the agent's /metrics counted every SVID)",
        "",
    ]
    for verdict in verdicts(report):
        lines.append(f"{verdict.key}: target {verdict.text}: {'MET' if verdict.met else 'NOT MET'}")
    lines.append(f"memory: no target; {memory.rss_after / MiB:.0f} MiB RSS with {memory.svids:,} SVIDs")
    return "\n".join(lines)


def render_json(report: Report, mode: Mode) -> str:
    memory = report.memory
    document = {
        "environment": _environment(mode),
        "latency": {
            key: {
                "name": latency.name,
                "n": len(latency.samples),
                **{f"p{which}_ms": round(latency.p(which) * 1000, 2) for which in (50, 90, 99)},
                "max_ms": round(max(latency.samples) * 1000, 2),
            }
            for key, latency in (
                ("first_response_1", report.one),
                ("first_response_500", report.concurrent),
                ("entry_to_svid", report.delivery),
            )
        },
        "agent_cpu_ms_per_concurrent_stream": round(report.agent_cpu_per_stream * 1000, 3),
        "create_entry_ack_p50_ms": round(percentile(report.acknowledged, 50) * 1000, 2),
        "memory": {
            "cached_svids": memory.svids,
            "rss_before_bytes": memory.rss_before,
            "rss_after_bytes": memory.rss_after,
            "setup_create_seconds": round(memory.create_seconds, 2),
            "setup_signed_seconds": round(memory.signed_seconds, 2),
        },
        "verdicts": {verdict.key: {"met": verdict.met, "text": verdict.text} for verdict in verdicts(report)},
    }
    return json.dumps(document, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "FetchX509SVID first-response latency with 1 and 500 concurrent workloads, entry-created-to-SVID-"
            "delivered latency, and the agent's memory with 10,000 cached SVIDs, with real spiffe-server and "
            f"spiffe-agent processes. Target: p99 < {P99_TARGET * 1000:.0f} ms."
        )
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples (the 10,000 SVIDs stay)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the tables")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    report = asyncio.run(run(mode))
    print(render_json(report, mode) if args.json else render_text(report, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
