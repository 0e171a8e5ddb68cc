"""Benchmark: the cost of the agent's front door (sidecar.agent.peer.FrontDoor) on gRPC calls.

Why this path is hot: every Workload API and SDS call of every workload on the node reaches the
agent's gRPC server through the front door, which relays each connection's bytes through Python
so that the servicer can learn the caller's pid, uid and gid. Its price is added latency on every
call, a few syscalls and a backend connection on every new connection, and CPU per byte on
large responses (bundles, many SVIDs).

What it measures, in one run, against the same gRPC server process and with the same client
program (each in its own process; the front door runs alone in this process, so this process's
CPU time is the relay's):

- ``unary``: sequential 100-byte unary echo calls on one channel; per-call latency p50/p99.
- ``connect``: a new channel (a new connection) for each 100-byte call; per-call latency.
- ``bulk``: unary echo of a 32 MiB message on one channel, so 64 MiB cross the relay per call;
  throughput (MiB/s each way) and the relay's CPU-seconds per GiB crossing it.

Routes: ``direct`` (the gRPC server's own unix socket: the floor), ``front door`` (the relay to
the server's private abstract address) and ``socat`` (``UNIX-LISTEN,fork`` to the same direct
socket, a C relay forking a process per connection; its CPU is not measured). Rounds are
interleaved so machine noise hits each route alike; medians of the rounds are reported.

Run from the repository root: ``.venv/bin/python bench/frontdoor.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.agent.peer import FrontDoor, grpc_backend_address

METHOD: Final = "/bench.Echo/Echo"
MiB: Final = 1 << 20
MESSAGE_LIMIT: Final = 64 * MiB
GRPC_OPTIONS: Final = [
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
]


# --- the gRPC server and the client, each run as its own process -----------------------------------


async def serve(direct: str, backend: str) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    server = grpc.aio.server(options=GRPC_OPTIONS)
    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{direct}")
    server.add_insecure_port(backend)
    await server.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(None)


def client(target: str, mode: str, count: int, size: int) -> dict[str, Any]:
    payload = os.urandom(size)
    latencies: list[int] = []
    if mode == "connect":
        for _ in range(count):
            started = time.perf_counter_ns()
            options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(target, options=options) as channel:
                channel.unary_unary(METHOD, None, None)(payload, timeout=30)
            latencies.append(time.perf_counter_ns() - started)
        return {"latencies": latencies}
    with grpc.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        call = channel.unary_unary(METHOD, None, None)
        for _ in range(max(3, count // 10)):  # warm-up
            assert call(payload, timeout=60) == payload
        started_all = time.perf_counter_ns()
        for _ in range(count):
            started = time.perf_counter_ns()
            reply = call(payload, timeout=60)
            latencies.append(time.perf_counter_ns() - started)
        elapsed = time.perf_counter_ns() - started_all
        assert reply == payload
    return {"latencies": latencies, "elapsed_ns": elapsed}


# --- the orchestration ----------------------------------------------------------------------------


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_client(target: str, mode: str, count: int, size: int) -> tuple[dict[str, Any], float]:
    """Run the client program; return its result and this process's (the relay's) CPU meanwhile."""
    before = cpu_seconds()
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "client", target, mode, str(count), str(size), stdout=subprocess.PIPE
    )
    stdout, _ = await process.communicate()
    assert process.returncode == 0, f"client {mode} {target} failed"
    return json.loads(stdout), cpu_seconds() - before


def percentile(values: list[int], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000


async def measure(quick: bool) -> dict[str, dict[str, float]]:
    unary_calls, connect_calls, bulk_calls, rounds = (1000, 100, 3, 3) if quick else (5000, 300, 8, 5)
    bulk_size = 32 * MiB
    workdir = Path(tempfile.mkdtemp(prefix="bench-frontdoor-"))
    direct, public, socat_path = workdir / "direct.sock", workdir / "public.sock", workdir / "socat.sock"
    backend = grpc_backend_address("bench-agent")
    server = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "server", str(direct), backend, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    socat: asyncio.subprocess.Process | None = None
    try:
        assert server.stdout is not None
        assert (await server.stdout.readline()).strip() == b"ready"
        routes = {"direct": f"unix:{direct}", "front door": f"unix:{public}"}
        socat_binary = shutil.which("socat")
        if socat_binary is not None:
            socat = await asyncio.create_subprocess_exec(
                socat_binary,
                f"UNIX-LISTEN:{socat_path},fork",
                f"UNIX-CONNECT:{direct}",
                stderr=subprocess.DEVNULL,  # it reports every client's close as a broken pipe
            )
            while not socat_path.exists():
                await asyncio.sleep(0.01)
            routes["socat"] = f"unix:{socat_path}"
        samples: dict[str, dict[str, list[float]]] = {route: {} for route in routes}
        async with FrontDoor(public, backend):
            for _ in range(rounds):
                for route, target in routes.items():
                    got = samples[route]
                    result, _ = await run_client(target, "unary", unary_calls, 100)
                    got.setdefault("unary p50 us", []).append(percentile(result["latencies"], 0.5))
                    got.setdefault("unary p99 us", []).append(percentile(result["latencies"], 0.99))
                    result, _ = await run_client(target, "connect", connect_calls, 100)
                    got.setdefault("connect+call p50 us", []).append(percentile(result["latencies"], 0.5))
                    result, cpu = await run_client(target, "bulk", bulk_calls, bulk_size)
                    seconds = result["elapsed_ns"] / 1e9
                    got.setdefault("bulk MiB/s each way", []).append(bulk_calls * bulk_size / MiB / seconds)
                    relayed_gib = 2 * bulk_size * (bulk_calls + max(3, bulk_calls // 10)) / (1 << 30)
                    got.setdefault("relay CPU-s/GiB", []).append(cpu / relayed_gib if route == "front door" else 0.0)
    finally:
        if socat is not None:
            socat.terminate()
            await socat.wait()
        if server.stdin is not None:
            server.stdin.close()
        await server.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        route: {metric: statistics.median(values) for metric, values in metrics.items()}
        for route, metrics in samples.items()
    }


def report(results: dict[str, dict[str, float]]) -> None:
    metrics = list(next(iter(results.values())))
    print(f"front door relay overhead (Python {sys.version.split()[0]}, medians of interleaved rounds)")
    print(f"{'route':<12}" + "".join(f"{metric:>22}" for metric in metrics))
    for route, values in results.items():
        cells = []
        for metric in metrics:
            measured = route == "front door" or not metric.startswith("relay CPU")
            cells.append(f"{values[metric]:>22.2f}" if measured else f"{'-':>22}")
        print(f"{route:<12}" + "".join(cells))
    direct, door = results["direct"], results["front door"]
    print(
        f"front door adds {door['unary p50 us'] - direct['unary p50 us']:.0f} us per unary call (p50), "
        f"{door['connect+call p50 us'] - direct['connect+call p50 us']:.0f} us per new connection's first call, "
        f"and carries {door['bulk MiB/s each way'] / direct['bulk MiB/s each way']:.0%} of the direct bulk throughput"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "server":
        asyncio.run(serve(sys.argv[2], sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        print(json.dumps(client(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results = asyncio.run(measure(args.quick))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)


if __name__ == "__main__":
    main()
