"""``spiffe-proxy`` as a real process: flags, the ready line, traffic from a stdlib TLS client to a
plaintext upstream, rejections and their log lines, SIGHUP reloads, the status endpoint, the
PROXY protocol header, and the drain on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.proxy.address import Address
from sidecar.proxy.proxyproto import Header, IncompleteHeaderError, decode
from spiffecore import SpiffeID
from tests.sidecar.proxy.support import echo_once, tls_client
from tests.support.agent import remove_socket_dir, running_agent, socket_dir, write_roots
from tests.support.ca import Minted, TestCA
from tests.support.process import Started, start_until_ready
from tests.support.server import running_server

READY = re.compile(
    r"spiffe-proxy ready: (?P<mode>server|client) mode, listening on (?P<listen>\S+), "
    r"upstream (?P<upstream>\S+), identity (?P<id>spiffe://[^,\s]+)(, status http://(?P<status>[^,\s]+))?"
    r"(, (?P<workers>[0-9]+) workers)?"
)
PROXY_ID = "/proxy"
CLIENT_ID = "/client"


def _script() -> str:
    found = shutil.which("spiffe-proxy", path=str(Path(sys.executable).parent))
    assert found is not None
    return found


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_script(), *argv], capture_output=True, text=True, timeout=60, check=False)  # noqa: S603


def write_identity(directory: Path, ca: TestCA, minted: Minted) -> tuple[Path, Path, Path]:
    cert, key, bundle = directory / "svid.pem", directory / "svid.key", directory / "bundle.pem"
    tmp = directory / "tmp"
    tmp.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in minted.chain))
    tmp.replace(cert)
    tmp.write_bytes(
        minted.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    tmp.replace(key)
    tmp.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    tmp.replace(bundle)
    return cert, key, bundle


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class Upstream:
    server: _Server
    thread: threading.Thread

    @property
    def address(self) -> str:
        host, port = self.server.socket.getsockname()[:2]
        return f"{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_upstream(handler: type[socketserver.BaseRequestHandler] = _Echo) -> Upstream:
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return Upstream(server, thread)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = start_upstream()
    yield up
    up.stop()


@dataclass
class Proxy:
    started: Started
    listen: Address
    status: str | None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.started.process

    def logs(self) -> list[dict[str, Any]]:
        lines = self.started.stderr_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_for_log(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.logs():
                if match(entry):
                    return entry
            time.sleep(0.05)
        raise AssertionError(f"no such log line in {self.logs()}")

    def stop(self, sig: signal.Signals | None = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (None: none, it is already stopping) and wait for the exit code."""
        if sig is not None and self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.started.stdout.close()
            self.started.stderr.close()


@dataclass
class Setup:
    ca: TestCA
    tmp: Path
    files: tuple[Path, Path, Path]
    proxies: list[Proxy]

    def start(self, upstream: str, *extra: str) -> Proxy:
        cert, key, bundle = self.files
        argv = [_script(), "--listen", "127.0.0.1:0", "--upstream", upstream]
        argv += ["--cert", str(cert), "--key", str(key), "--bundle", str(bundle), *extra]
        started = start_until_ready(argv, logs=self.tmp, name="spiffe-proxy", ready=READY, timeout=30)
        listen = Address.parse(started.ready["listen"])
        proxy = Proxy(started, listen, started.ready["status"])
        self.proxies.append(proxy)
        return proxy

    def client(self, path: str = CLIENT_ID) -> ssl.SSLContext:
        return tls_client(self.ca.mint(path).svid(), self.ca)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    ca = TestCA.create()
    result = Setup(ca, tmp_path, write_identity(tmp_path, ca, ca.mint(PROXY_ID)), [])
    yield result
    for proxy in result.proxies:
        if proxy.process.poll() is None:
            proxy.stop(signal.SIGKILL)


def allow_client(setup: Setup) -> list[str]:
    return ["--allow-id", setup.ca.trust_domain.id_string() + CLIENT_ID]


def server_serial(address: Address, context: ssl.SSLContext) -> int:
    with socket.create_connection((address.host, address.port), timeout=10) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(b"x")
        assert tls.recv(1) == b"x"
        return x509.load_der_x509_certificate(der).serial_number


def refused_exchange(address: Address, context: ssl.SSLContext) -> None:
    """An exchange the proxy must refuse: raises the client's TLS or socket error (a TLS 1.3
    client may see the alert only when it reads, or just a closed connection)."""
    if not echo_once(address, context, b"let me in"):
        raise ConnectionResetError("the proxy closed the connection")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own status endpoint
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


# --- flags and configuration ------------------------------------------------------------------


def test_help_names_the_contract_flags() -> None:
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for flag in (
        "--listen",
        "--upstream",
        "--mode",
        "--workload-api",
        "--cert",
        "--key",
        "--bundle",
        "--allow-id",
        "--allow-trust-domain",
        "--allow-pattern",
        "--allow-any-id",
        "--status",
        "--max-conns",
        "--proxy-protocol",
        "--handshake-timeout",
        "--connect-timeout",
        "--idle-timeout",
        "--close-timeout",
        "--drain-timeout",
        "--unsafe-listen",
        "--unsafe-upstream",
        "--log-format",
        "--log-level",
        "--policy",
        "--workers",
    ):
        assert flag in result.stdout
    assert "--worker-port" not in result.stdout  # the workers' own flags are hidden


@pytest.mark.parametrize("mode", ["server", "client"])
def test_no_allow_rule_is_a_configuration_error(setup: Setup, mode: str) -> None:
    cert, key, bundle = setup.files
    result = _run(
        "--mode", mode, "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1",
        "--cert", str(cert), "--key", str(key), "--bundle", str(bundle),
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        "spiffe-proxy: error: proxy: at least one of --allow-id, --allow-trust-domain, --allow-pattern "
        "or --allow-any-id is required"
    ) in result.stderr


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["--upstream", "10.1.2.3:80"],
            "plaintext upstream must be a unix socket or a loopback address (use --unsafe-upstream to allow it)",
        ),
        (
            ["--mode", "client", "--listen", "0.0.0.0:0", "--upstream", "10.1.2.3:443"],
            "plaintext listen address must be a unix socket or a loopback address (use --unsafe-listen to allow it)",
        ),
        (["--upstream", "nope"], "address must be host:port, [v6]:port or unix:/path"),
        (["--upstream", "127.0.0.1:1", "--workload-api", "unix:///tmp/x.sock"], "cannot be combined"),
        (["--upstream", "127.0.0.1:1", "--status", "127.0.0.1:x"], "bad --status address"),
    ],
)
def test_unsafe_or_malformed_configuration_exits_2(setup: Setup, argv: list[str], says: str) -> None:
    cert, key, bundle = setup.files
    base = ["--listen", "127.0.0.1:0", "--cert", str(cert), "--key", str(key), "--bundle", str(bundle)]
    result = _run(*base, "--allow-any-id", *argv)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr


def test_no_identity_source_is_a_configuration_error() -> None:
    result = subprocess.run(  # noqa: S603
        [_script(), "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--allow-any-id"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "an identity source is required" in result.stderr


def test_unreadable_identity_files_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    result = _run(
        "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--allow-any-id",
        "--cert", str(missing), "--key", str(missing), "--bundle", str(missing),
    )  # fmt: skip
    assert result.returncode == 2
    assert "could not read the certificate file" in result.stderr


# --- traffic ------------------------------------------------------------------------------------


def test_server_mode_relays_an_allowed_client_and_logs_it(setup: Setup, upstream: Upstream) -> None:
    proxy = setup.start(upstream.address, *allow_client(setup))
    ready = proxy.started.ready
    assert ready["mode"] == "server"
    assert ready["upstream"] == upstream.address
    assert ready["id"] == setup.ca.trust_domain.id_string() + PROXY_ID
    payload = b"hello through spiffe-proxy" * 1000
    assert echo_once(proxy.listen, setup.client(), payload) == payload
    accepted = proxy.wait_for_log(lambda e: e["msg"] == "connection accepted")
    assert accepted["spiffe_id"] == setup.ca.trust_domain.id_string() + CLIENT_ID
    assert proxy.stop() == 0


def test_a_disallowed_id_is_rejected_and_logged_with_the_reason(setup: Setup, upstream: Upstream) -> None:
    proxy = setup.start(upstream.address, *allow_client(setup))
    with pytest.raises((ssl.SSLError, OSError)):
        refused_exchange(proxy.listen, setup.client("/intruder"))
    intruder = setup.ca.trust_domain.id_string() + "/intruder"
    rejected = proxy.wait_for_log(lambda e: e["msg"] == "connection rejected")
    assert rejected["level"] == "warning"
    assert rejected["spiffe_id"] == intruder
    assert "is not allowed" in rejected["reason"]
    assert rejected["peer_address"].startswith("127.0.0.1:")
    assert proxy.stop() == 0


def test_sighup_reloads_replaced_files_for_new_connections(setup: Setup, upstream: Upstream) -> None:
    proxy = setup.start(upstream.address, *allow_client(setup), "--log-format", "json")
    context = setup.client()
    first = server_serial(proxy.listen, context)
    newer = setup.ca.mint(PROXY_ID)
    write_identity(setup.tmp, setup.ca, newer)
    proxy.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    serial = first
    while serial == first and time.monotonic() < deadline:
        time.sleep(0.05)
        serial = server_serial(proxy.listen, context)
    assert serial == newer.leaf.serial_number
    proxy.wait_for_log(lambda e: e["msg"] == "SIGHUP: reloading the identity files")
    assert proxy.stop() == 0


def test_status_endpoints(setup: Setup) -> None:
    up = start_upstream()
    proxy = setup.start(up.address, *allow_client(setup), "--status", "127.0.0.1:0")
    assert proxy.status is not None
    base = f"http://{proxy.status}"
    assert http_get(base + "/healthz")[0] == 200
    assert http_get(base + "/readyz") == (200, "ready\n")
    payload = b"count me" * 100
    assert echo_once(proxy.listen, setup.client(), payload) == payload
    with pytest.raises((ssl.SSLError, OSError)):
        refused_exchange(proxy.listen, setup.client("/intruder"))
    deadline = time.monotonic() + 10
    while True:
        code, metrics = http_get(base + "/metrics")
        assert code == 200
        if f'spiffe_proxy_bytes_total{{direction="to_upstream"}} {float(len(payload))}' in metrics:
            break
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
    assert "spiffe_proxy_connections_accepted_total 2.0" in metrics
    assert 'spiffe_proxy_handshakes_total{reason="",result="ok"} 1.0' in metrics
    assert 'spiffe_proxy_rejections_total{reason="not_allowed"} 1.0' in metrics
    assert f'spiffe_proxy_bytes_total{{direction="to_downstream"}} {float(len(payload))}' in metrics
    assert "spiffe_proxy_certificate_expiry_timestamp_seconds 0.0" not in metrics
    up.stop()
    deadline = time.monotonic() + 10
    while (answer := http_get(base + "/readyz"))[0] != 503:
        assert time.monotonic() < deadline, answer
        time.sleep(0.1)
    assert answer == (503, "not ready: the upstream is unreachable\n")
    assert proxy.stop() == 0


class _ProxyProtocolUpstream(socketserver.BaseRequestHandler):
    headers: list[Header] = []  # noqa: RUF012 - shared with the test on purpose

    def handle(self) -> None:
        buffer = b""
        while True:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            buffer += chunk
            try:
                header, used = decode(buffer)
            except IncompleteHeaderError:
                continue
            break
        self.headers.append(header)
        rest = buffer[used:]
        if rest:
            self.request.sendall(rest)
        while data := self.request.recv(65536):
            self.request.sendall(data)


def test_proxy_protocol_header_carries_the_client_address_and_spiffe_id(setup: Setup) -> None:
    _ProxyProtocolUpstream.headers = []
    up = start_upstream(_ProxyProtocolUpstream)
    try:
        proxy = setup.start(up.address, *allow_client(setup), "--proxy-protocol")
        context = setup.client()
        with (
            socket.create_connection((proxy.listen.host, proxy.listen.port), timeout=10) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"ping")
            assert tls.recv(4) == b"ping"
            client_address = tls.getsockname()[:2]
        [header] = _ProxyProtocolUpstream.headers
        assert header.source == client_address
        assert header.destination == (proxy.listen.host, proxy.listen.port)
        assert header.spiffe_id == SpiffeID.parse(setup.ca.trust_domain.id_string() + CLIENT_ID)
        assert proxy.stop() == 0
    finally:
        up.stop()


def test_sigterm_drains_open_connections_then_exits_0(setup: Setup, upstream: Upstream) -> None:
    proxy = setup.start(upstream.address, *allow_client(setup), "--drain-timeout", "20")
    context = setup.client()
    with (
        socket.create_connection((proxy.listen.host, proxy.listen.port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"before")
        assert tls.recv(6) == b"before"
        proxy.process.send_signal(signal.SIGTERM)
        proxy.wait_for_log(lambda e: e["msg"] == "shutting down: draining connections")
        with pytest.raises(ConnectionRefusedError):  # no longer accepting
            socket.create_connection((proxy.listen.host, proxy.listen.port), timeout=2).close()
        assert proxy.process.poll() is None  # still draining the open connection
        tls.sendall(b"during the drain")
        assert tls.recv(64) == b"during the drain"
    assert proxy.stop(None) == 0  # a second SIGTERM would interrupt the drain, as it should


# --- the Workload API, from a real server and agent ---------------------------------------------


def test_workload_api_identity_through_client_and_server_mode(tmp_path: Path, upstream: Upstream) -> None:
    """Plain TCP → client-mode proxy → mTLS → server-mode proxy → echo upstream; both proxies take
    their SVID from a real agent (an entry for this process's uid)."""
    node = "spiffe://example.org/node/proxy-test"
    proxy_id = "spiffe://example.org/proxy"
    sockets = socket_dir()
    proxies: list[Started] = []
    try:
        with running_server(tmp_path / "server") as server:
            server.cli_json(
                "entry", "create", "--spiffe-id", proxy_id, "--parent-id", node,
                "--selector", f"unix:uid:{os.getuid()}",
            )  # fmt: skip
            token = server.token("--spiffe-id", node)
            roots = write_roots(server, tmp_path / "roots.pem")
            socket_path = sockets / "public" / "api.sock"
            with running_agent(
                tmp_path / "agent", server.address, socket_path=socket_path, join_token=token, trust_bundle=roots
            ):
                api = f"unix://{socket_path}"
                inbound = start_until_ready(
                    [_script(), "--listen", "127.0.0.1:0", "--upstream", upstream.address,
                     "--workload-api", api, "--allow-id", proxy_id],
                    logs=tmp_path, name="spiffe-proxy", ready=READY, timeout=60,
                )  # fmt: skip
                proxies.append(inbound)
                assert inbound.ready["id"] == proxy_id
                outbound = start_until_ready(
                    [_script(), "--mode", "client", "--listen", "127.0.0.1:0",
                     "--upstream", inbound.ready["listen"], "--allow-id", proxy_id],
                    logs=tmp_path, name="spiffe-proxy", ready=READY, timeout=60,
                    env={**os.environ, "SPIFFE_ENDPOINT_SOCKET": api},
                )  # fmt: skip
                proxies.append(outbound)
                listen = Address.parse(outbound.ready["listen"])
                with socket.create_connection((listen.host, listen.port), timeout=10) as plain:
                    plain.sendall(b"through two proxies")
                    received = b""
                    while len(received) < 19:
                        chunk = plain.recv(64)
                        assert chunk
                        received += chunk
                    assert received == b"through two proxies"
                for started in proxies:
                    started.process.send_signal(signal.SIGTERM)
                    assert started.process.wait(30) == 0
    finally:
        for started in proxies:
            if started.process.poll() is None:
                started.process.kill()
                started.process.wait()
            started.stdout.close()
            started.stderr.close()
        remove_socket_dir(sockets)
