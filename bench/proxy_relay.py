"""Micro-benchmark of spiffe-proxy's hot path: relay CPU per GiB on each loop, and handshake cost.

Why these paths are hot: every byte a legacy service sends or receives through the proxy crosses
the relay (decrypt or encrypt, one copy into and out of OpenSSL's memory BIO, one send), and
every new connection pays a full mTLS handshake plus the proxy's connection set-up. These numbers
are for the proxy's own design decisions; ``bench/proxy.py`` (next) compares the whole proxy with
Envoy, HAProxy and stunnel.

What it measures, in one run:

1. In process, no sockets: CPU-ms of one full mTLS handshake, both sides (ECDSA P-256, TLS 1.3,
   no tickets), with the stdlib ``ssl`` (system OpenSSL 3.0) and with pyOpenSSL (OpenSSL 4): the
   choice of TLS library in ``sidecar/proxy/tls.py``.
2. A server-mode proxy in a child process, on the default asyncio loop and on uvloop, between a
   stdlib TLS client and a discarding plaintext upstream (both in this process, in threads):
   - CPU-seconds of the proxy process per GiB sent client -> upstream over one connection
     (decrypt, "in"), and upstream -> client (encrypt, "out"), with the wall-clock MB/s (the
     client is Python too, so it may be the bottleneck);
   - new connections per second (sequential: handshake + one byte each way) and the proxy's
     CPU-ms per connection.
The proxy's CPU is read from /proc/<pid>/stat (user + system) before and after each phase.

Run from the repository root: ``.venv/bin/python bench/proxy_relay.py [--gib 1] [--connections 500]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

import uvloop
from OpenSSL import SSL

from sidecar.proxy.address import Address
from sidecar.proxy.policy import Policy
from sidecar.proxy.server import ProxyServer
from sidecar.proxy.source import PEMFiles, file_source
from sidecar.proxy.tls import ProxyTLS, build_context
from spiffecore import BundleSet
from spiffecore.tls import client_context, server_context
from tests.support.ca import TestCA

CHUNK = 256 * 1024
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


# --- 1. handshakes in process -------------------------------------------------------------------


def stdlib_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_side=False)
    done_s = done_c = False
    while not (done_s and done_c):
        if not done_c:
            try:
                c.do_handshake()
                done_c = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not done_s:
            try:
                s.do_handshake()
                done_s = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())


def openssl_handshake(server: SSL.Context, client: SSL.Context) -> None:
    s = SSL.Connection(server, None)
    s.set_accept_state()
    c = SSL.Connection(client, None)
    c.set_connect_state()

    def pump(a: SSL.Connection, b: SSL.Connection) -> None:
        with contextlib.suppress(SSL.WantReadError):
            b.bio_write(a.bio_read(65536))

    done_s = done_c = False
    while not (done_s and done_c):
        if not done_c:
            try:
                c.do_handshake()
                done_c = True
            except SSL.WantReadError:
                pass
        pump(c, s)
        if not done_s:
            try:
                s.do_handshake()
                done_s = True
            except SSL.WantReadError:
                pass
        pump(s, c)


def per_call_ms(function: Callable[[], None], count: int) -> float:
    function()
    start = cpu_self()
    for _ in range(count):
        function()
    return (cpu_self() - start) / count * 1000


def handshake_table(ca: TestCA, count: int) -> None:
    server_svid, client_svid = ca.mint("/server").svid(), ca.mint("/client").svid()
    bundles = BundleSet.of(ca.bundle())
    std_s, std_c = server_context(server_svid, bundles), client_context(client_svid, bundles)

    def accept_all(ok: int, store: object) -> int:
        return ok

    oss_s = build_context(server_svid, bundles, accept_all, server_side=True)
    oss_c = build_context(client_svid, bundles, accept_all, server_side=False)
    rows = []
    for _ in range(3):  # interleaved repetitions
        rows.append((per_call_ms(lambda: stdlib_handshake(std_s, std_c), count),
                     per_call_ms(lambda: openssl_handshake(oss_s, oss_c), count)))  # fmt: skip
    std = sorted(r[0] for r in rows)[1]
    oss = sorted(r[1] for r in rows)[1]
    print("\nfull mTLS handshake, both sides in one process (median of 3 x", count, "):")
    print(f"  {'library':<38} {'CPU-ms':>8}")
    print(f"  {'stdlib ssl, ' + ssl.OPENSSL_VERSION:<38} {std:8.2f}")
    print(f"  {'pyOpenSSL, ' + SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode():<38} {oss:8.2f}")


# --- 2. the proxy in a child process ------------------------------------------------------------


async def serve(loop_name: str, directory: Path, upstream: str) -> None:
    files = PEMFiles(directory / "server.pem", directory / "server.key", directory / "bundle.pem")
    async with file_source(files) as source:
        await source.ready(10)
        tls = ProxyTLS(source, Policy.from_rules(allow_any_id=True).authorizer(), server_side=True)
        server = ProxyServer(listen=Address.parse("127.0.0.1:0"), upstream=Address.parse(upstream), tls=tls)
        async with server:
            print(server.bound.port, flush=True)
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()


def discard_upstream() -> tuple[socket.socket, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)

    def run() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=drain, args=(conn,), daemon=True).start()

    def drain(conn: socket.socket) -> None:
        buffer = bytearray(CHUNK)
        with conn:
            first = conn.recv(9, socket.MSG_PEEK)
            if first[:1] == b"R":  # "send me this many bytes": the out direction
                header = conn.recv(9, socket.MSG_WAITALL)
                left = int.from_bytes(header[1:], "big")
                payload = memoryview(os.urandom(CHUNK))
                while left > 0:
                    left -= conn.send(payload[: min(left, CHUNK)])
                conn.shutdown(socket.SHUT_WR)
            while True:
                n = conn.recv_into(buffer)
                if not n:
                    return
                if n == 1:  # the connection benchmark's ping
                    conn.sendall(b"p")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener, thread


def measure(
    loop_name: str, directory: Path, client: ssl.SSLContext, *, upstream: int, gib: float, connections: int
) -> str:
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and script
        [
            sys.executable,
            __file__,
            "--serve",
            loop_name,
            "--dir",
            str(directory),
            "--upstream",
            f"127.0.0.1:{upstream}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        payload = os.urandom(CHUNK)
        total = int(gib * 1024**3)
        with socket.create_connection(("127.0.0.1", port)) as raw, client.wrap_socket(raw) as tls:
            tls.sendall(b"x")  # warm up
            start_cpu, start = cpu_of(process.pid), time.perf_counter()
            sent = 0
            while sent < total:
                tls.sendall(payload)
                sent += len(payload)
            tls.unwrap()
            wall = time.perf_counter() - start
        time.sleep(0.2)
        relay_cpu = cpu_of(process.pid) - start_cpu
        with socket.create_connection(("127.0.0.1", port)) as raw, client.wrap_socket(raw) as tls:
            tls.sendall(b"R" + total.to_bytes(8, "big"))
            buffer = bytearray(CHUNK)
            received = tls.recv_into(buffer)  # the first bytes: the proxy is connected upstream
            start_cpu, start = cpu_of(process.pid), time.perf_counter()
            while True:
                n = tls.recv_into(buffer)
                if not n:
                    break
                received += n
            out_wall = time.perf_counter() - start
        time.sleep(0.2)
        out_cpu = cpu_of(process.pid) - start_cpu
        assert received == total, (received, total)
        start_cpu, start = cpu_of(process.pid), time.perf_counter()
        for _ in range(connections):
            with socket.create_connection(("127.0.0.1", port)) as raw, client.wrap_socket(raw) as tls:
                tls.sendall(b"p")
                tls.recv(1)
        rate_wall = time.perf_counter() - start
        conn_cpu = cpu_of(process.pid) - start_cpu
        return (
            f"  {loop_name:<8} {relay_cpu / (sent / 1024**3):>9.2f} {sent / wall / 1e6:>7.0f}"
            f" {out_cpu / (received / 1024**3):>9.2f} {received / out_wall / 1e6:>7.0f}"
            f" {connections / rate_wall:>10.0f} {conn_cpu / connections * 1000:>14.2f}"
        )
    finally:
        process.terminate()
        process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB to send through the relay per loop")
    parser.add_argument("--connections", type=int, default=500, help="sequential new connections per loop")
    parser.add_argument("--handshakes", type=int, default=300, help="in-process handshakes per repetition")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        if args.serve == "uvloop":
            uvloop.run(serve(args.serve, Path(args.dir), args.upstream))
        else:
            asyncio.run(serve(args.serve, Path(args.dir), args.upstream))
        return
    ca = TestCA.create("example.org")
    handshake_table(ca, args.handshakes)
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        server_svid = ca.mint("/server").svid()
        (directory / "server.pem").write_bytes(server_svid.cert_chain_pem())
        (directory / "server.key").write_bytes(server_svid.private_key_pem())
        (directory / "bundle.pem").write_bytes(ca.x509_bundle().pem())
        client = client_context(ca.mint("/client").svid(), BundleSet.of(ca.bundle()))
        listener, _ = discard_upstream()
        print(f"\nserver-mode proxy process, {args.gib:g} GiB over 1 connection, {args.connections} new connections:")
        print(f"  {'':<8} {'CPU-s/GiB':>9} {'MB/s':>7} {'CPU-s/GiB':>9} {'MB/s':>7}")
        print(f"  {'loop':<8} {'in':>9} {'in':>7} {'out':>9} {'out':>7} {'conn/s':>10} {'CPU-ms/conn':>14}")
        for loop_name in ("asyncio", "uvloop"):
            print(
                measure(
                    loop_name,
                    directory,
                    client,
                    upstream=listener.getsockname()[1],
                    gib=args.gib,
                    connections=args.connections,
                ),
                flush=True,
            )
        listener.close()


if __name__ == "__main__":
    main()
