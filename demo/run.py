"""``make demo``: the whole system on this machine, narrated step by step.

    python -m demo [--duration SECONDS] [--keep] [--quiet] [--pause SECONDS]

In a new temporary directory it starts, as real processes: ``spiffe-server run`` (SQLite), a
``spiffe-agent run`` attested with a join token, two tiny HTTP services (``frontend`` calls
``backend``, :mod:`demo.services`), and an Envoy sidecar for each, rendered from
``deploy/envoy/*.tmpl`` and fed its certificate and trust bundle over SDS by the agent. The two
Envoys run as the same user, so the agent tells them apart by the path of their executable:
each runs through its own hard link to the Envoy binary, and each entry selects one path
(``unix:path``, with the agent's ``discover_workload_path``). No root needed.

Then it shows, in eight steps: the control plane and its CA, the attested agent, the entries,
the sidecars' certificates (read from Envoy's admin ``/certs``), a request from frontend to
backend over mTLS (the backend sees the caller's SPIFFE ID in ``x-forwarded-client-cert``), an
intruder with a valid SVID of the same trust domain refused by the backend's sidecar, a legacy
plaintext service wrapped by ``spiffe-proxy`` (server mode, its SVID from the agent's Workload
API) that the frontend calls through an Envoy sidecar and that refuses the intruder, and a live
rotation under traffic. It keeps running (a request a second, a line a minute) until Ctrl-C,
SIGTERM or ``--duration``, then stops every process, last started first.

Exit codes: 0 when the steps succeeded and everything stopped cleanly; 1 when a step failed
(the message names the step and shows the last log lines of the process concerned); 130 when
interrupted before the steps were done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from demo.envoy import EnvoyAdmin, Leaf, envoy_binary, own_path
from demo.legacy import PROXY_READY, log_records, own_python
from demo.processes import Child, DemoError, Supervisor
from spiffecore import X509SVID, SpiffeError, TrustDomain, X509Bundle, verify_x509_svid
from spiffeproto import registration_pb2, registration_pb2_grpc

ROOT: Final = Path(__file__).resolve().parents[1]
RENDER_PY: Final = ROOT / "deploy" / "envoy" / "render.py"
TRUST_DOMAIN: Final = "demo.example"
NODE_ID: Final = f"spiffe://{TRUST_DOMAIN}/node"
FRONTEND_ID: Final = f"spiffe://{TRUST_DOMAIN}/frontend"
BACKEND_ID: Final = f"spiffe://{TRUST_DOMAIN}/backend"
INTRUDER_ID: Final = f"spiffe://{TRUST_DOMAIN}/intruder"
LEGACY_ID: Final = f"spiffe://{TRUST_DOMAIN}/legacy"
STEPS: Final = 8
READY_TIMEOUT: Final = 30.0
REQUEST_TIMEOUT: Final = 5.0
ROTATION_TIMEOUT: Final = 10.0
ROTATED_TTL: Final = 120  # seconds: the agent then renews the backend's SVID about every minute
REPORT_EVERY: Final = 60.0
SERVER_READY: Final = re.compile(
    r"spiffe-server ready: trust domain (?P<td>\S+), agent API on (?P<address>[^\s,]+), admin socket (?P<socket>.+)"
)
AGENT_READY: Final = re.compile(r"spiffe-agent ready: (?P<id>\S+) serving the Workload API on (?P<socket>.+)")
SSL_REASONS: Final = {
    "fail_verify_san": "its SPIFFE ID is not one the sidecar allows",
    "fail_verify_error": "its certificate does not chain to the trust bundle",
    "fail_verify_no_cert": "it presented no certificate",
    "fail_verify_cert_hash": "its certificate hash is not allowed",
}

T = TypeVar("T")


# --- narration --------------------------------------------------------------------------------------


@dataclass
class Narrator:
    """Plain-words output: step headers and details (hidden by ``quiet``), results, pauses."""

    out: TextIO
    quiet: bool = False
    pause_seconds: float = 1.0
    step_number: int = 0
    phase: str = "start-up"  # where a failure happened, for its message

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def say(self, text: str) -> None:
        self._print(text)

    def step(self, title: str) -> None:
        self.step_number += 1
        self.phase = f"step {self.step_number} ({title})"
        if not self.quiet:
            self._print(f"\n[{self.step_number}/{STEPS}] {title}")

    def detail(self, text: str) -> None:
        if not self.quiet:
            for line in text.splitlines():
                self._print(f"      {line}")

    def ok(self, text: str) -> None:
        self._print(f"  OK  {text}")

    async def pause(self) -> None:
        await asyncio.sleep(self.pause_seconds)


# --- small helpers --------------------------------------------------------------------------------------


def console_script(name: str) -> Path:
    """One of our commands, installed beside this interpreter."""
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise DemoError(f"{name} is not installed beside {sys.executable}: run 'make install' first")
    return Path(found)


def http_get_json(url: str, *, timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict[str, Any]]:
    """GET ``url``: the status and the JSON body (error statuses too)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http to the demo's services
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            document = json.loads(body)
        except ValueError:
            document = {"error": body.decode(errors="replace")}
        return err.code, document


def describe_ca(certificate: x509.Certificate) -> str:
    key = certificate.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        kind = f"EC {key.curve.name}"
    elif isinstance(key, rsa.RSAPublicKey):
        kind = f"RSA-{key.key_size}"
    else:
        kind = type(key).__name__
    origin = (
        "self-signed"
        if certificate.issuer == certificate.subject
        else f"issued by {certificate.issuer.rfc4514_string()}"
    )
    fingerprint = certificate.fingerprint(hashes.SHA256()).hex(":")
    return (
        f"{origin}, {kind}, valid until {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, "
        f"SHA-256 {fingerprint[:23]}..."
    )


def short_serial(serial: int) -> str:
    text = f"{serial:x}"
    return text if len(text) <= 16 else f"{text[:16]}..."


def intruder_attempt(port: int, cert: Path, key: Path, bundle: Path, *, server: str = "the sidecar") -> str:
    """mTLS to ``server`` (the backend's sidecar, or spiffe-proxy) with the intruder's SVID; what
    happened, in a few words.

    The intruder checks the server's chain against the bundle (it is the real server), presents
    its own SVID, and sends a request. The server refuses the SVID during the handshake.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # SPIFFE IDs are URI SANs, not host names; the chain is still verified
    context.load_verify_locations(cafile=str(bundle))
    context.load_cert_chain(str(cert), str(key))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
            data = tls.recv(65536)
    except ssl.SSLEOFError:
        return f"{server} cut the connection during the TLS handshake; no HTTP response"
    except ssl.SSLError as err:
        return f"the TLS handshake failed ({err.reason or err}); no HTTP response"
    except OSError as err:
        return f"connection error: {err.strerror or err}"
    if data.startswith(b"HTTP/"):
        status_line = data.partition(b"\r\n")[0].decode(errors="replace")
        raise DemoError(f"the intruder got through: {status_line}")
    return f"connection closed by {server}" if not data else f"unexpected answer {data[:60]!r}"


def ssl_counters(stats: dict[str, Any]) -> dict[str, int]:
    """The TLS counters of the sidecar's listeners (``listener.<address>_<port>.ssl.<name>``), summed by name.

    The stat name carries the configured address, port 0 included, so listeners are matched by shape.
    """
    counters: dict[str, int] = {}
    for name, value in stats.items():
        prefix, _, counter = name.partition(".ssl.")
        if prefix.startswith("listener.") and prefix != "listener.admin" and counter and "." not in counter:
            counters[counter] = counters.get(counter, 0) + int(value)
    return counters


async def poll(check: Callable[[], T | None], *, timeout: float, interval: float, what: str) -> T:
    """Run ``check`` (blocking, in a thread) until it returns something; DemoError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(check)
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise DemoError(f"{what} within {timeout:.0f} s")
        await asyncio.sleep(interval)


@dataclass
class Traffic:
    """Requests one after another through the frontend; counts of successes and failures."""

    url: str
    interval: float
    ok: int = 0
    failures: list[str] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            await self.once()
            await asyncio.sleep(self.interval)

    async def once(self) -> None:
        try:
            status, document = await asyncio.to_thread(http_get_json, self.url)
        except (OSError, ValueError) as err:
            self.failures.append(str(err))
            return
        if status == 200 and document.get("backend", {}).get("caller") == FRONTEND_ID:
            self.ok += 1
        else:
            self.failures.append(f"{status} {document}")


@contextlib.asynccontextmanager
async def background(work: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``work`` as a task for the ``async with`` block, cancelled at its end."""
    task = asyncio.create_task(work)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the demo ----------------------------------------------------------------------------------------------


@dataclass
class Sidecar:
    """A running Envoy, its admin API, and the certificate it serves."""

    child: Child
    admin: EnvoyAdmin
    leaf: Leaf


class Demo:
    """The eight steps, then the mesh left running; every process through ``supervisor``."""

    def __init__(self, workdir: Path, supervisor: Supervisor, narrator: Narrator) -> None:
        self.workdir = workdir
        self.supervisor = supervisor
        self.narrator = narrator
        self.steps_done = False
        self.admin_socket = Path()
        self.server_address = ""
        self.bundle_path = workdir / "bundle.pem"
        self.agent_socket = workdir / "agent.sock"
        self.agent: Child | None = None
        self.binaries: dict[str, Path] = {}
        self.entries: dict[str, str] = {}  # SPIFFE ID -> entry ID
        self.selectors: dict[str, str] = {}  # SPIFFE ID -> selector
        self.services: dict[str, Child] = {}
        self.sidecars: dict[str, Sidecar] = {}
        self.frontend_url = ""
        self.envoy = Path()
        self.proxy_python = Path()  # the interpreter's path that spiffe-proxy runs through (its selector)

    async def run(self, duration: float | None) -> None:
        say = self.narrator
        self.envoy = envoy_binary()  # before anything starts: without Envoy there is no demo
        for step in (
            self.control_plane,
            self.node_agent,
            self.register,
            self.start_mesh,
            self.request,
            self.intruder,
            self.legacy,
            self.rotation,
        ):
            await step()
            await say.pause()
        self.steps_done = True
        await self.keep_running(duration)

    async def admin(self, *argv: str, what: str) -> str:
        """``spiffe-server <argv>`` against our server's admin socket; its stdout."""
        result = await self.supervisor.run(
            [console_script("spiffe-server"), *argv, "--admin-socket", self.admin_socket], what=what
        )
        return result.stdout

    # 1
    async def control_plane(self) -> None:
        say = self.narrator
        say.step("Start the control plane")
        data_dir = self.workdir / "server"
        argv: list[str | Path] = [
            console_script("spiffe-server"),
            "run",
            "--trust-domain",
            TRUST_DOMAIN,
            "--data-dir",
            data_dir,
            "--bind",
            "127.0.0.1:0",
        ]
        say.detail(f"$ spiffe-server run --trust-domain {TRUST_DOMAIN} --data-dir {data_dir} --bind 127.0.0.1:0")
        server = await self.supervisor.start("the control plane (spiffe-server)", argv, log_name="spiffe-server")
        line = await server.first_line(timeout=READY_TIMEOUT, what="that it is ready")
        match = SERVER_READY.fullmatch(line)
        if match is None:
            raise DemoError(f"unexpected ready line from spiffe-server: {line!r}", server)
        self.admin_socket = Path(match["socket"])
        self.server_address = match["address"]
        roots = await self.admin("bundle", "show", what="read the trust bundle")
        self.bundle_path.write_text(roots)
        authorities = x509.load_pem_x509_certificates(roots.encode())
        say.detail(f"store: SQLite in {data_dir}; admin socket {self.admin_socket}")
        for authority in authorities:
            say.detail(f"its CA certificate: {describe_ca(authority)}")
        say.ok(
            f"control plane up (pid {server.pid}): trust domain {match['td']}, "
            f"agent API on {self.server_address}, {len(authorities)} CA certificate(s) in the bundle"
        )

    # 2
    async def node_agent(self) -> None:
        say = self.narrator
        say.step("Start the node agent and attest it with a join token")
        token = (await self.admin("token", "generate", "--spiffe-id", NODE_ID, what="generate a join token")).strip()
        say.detail(f"$ spiffe-server token generate --spiffe-id {NODE_ID}   (single use, 10 minutes)")
        config = self.workdir / "agent.yaml"
        config.write_text(
            json.dumps(  # JSON is YAML: no quoting to get wrong
                {
                    "trust_domain": TRUST_DOMAIN,
                    "server": self.server_address,
                    "trust_bundle": str(self.bundle_path),
                    "join_token": token,
                    "data_dir": str(self.workdir / "agent"),
                    "socket": str(self.agent_socket),
                    "workload_attestors": {"unix": {"discover_workload_path": True, "workload_size_limit": -1}},
                },
                indent=2,
            )
        )
        config.chmod(0o600)
        say.detail(
            f"$ spiffe-agent run --config {config}\n"
            "  (the token, the bundle as first trust, and workload_attestors.unix.discover_workload_path:\n"
            "   the agent tells workloads apart by the path of their executable, unix:path)"
        )
        agent = await self.supervisor.start(
            "the agent (spiffe-agent)", [console_script("spiffe-agent"), "run", "--config", config], log_name="agent"
        )
        self.agent = agent
        line = await agent.first_line(timeout=READY_TIMEOUT, what="that it attested and is ready")
        match = AGENT_READY.fullmatch(line)
        if match is None:
            raise DemoError(f"unexpected ready line from spiffe-agent: {line!r}", agent)
        say.detail(f"the token made it an alias of {NODE_ID}, so entries can name that as their parent")
        say.ok(f"agent attested (pid {agent.pid}): {match['id']}, Workload API and SDS on {match['socket']}")

    # 3
    async def register(self) -> None:
        say = self.narrator
        say.step("Register who gets which SPIFFE ID")
        bin_dir = self.workdir / "bin"
        self.binaries = {name: own_path(self.envoy, bin_dir, f"{name}-envoy") for name in ("frontend", "backend")}
        python = Path("/proc/self/exe").readlink()  # what the kernel reports for any process of this Python
        self.proxy_python = own_python(self.workdir / "proxy-python")
        say.detail(
            f"the Envoy binary {self.envoy} gets a hard link per sidecar in {bin_dir}:\n"
            "both sidecars run as this user, so the path of the executable is what tells them apart;\n"
            f"spiffe-proxy (step 7) is Python, so it runs through a path of its own, {self.proxy_python}"
        )
        self.selectors = {
            FRONTEND_ID: f"unix:path:{self.binaries['frontend']}",
            BACKEND_ID: f"unix:path:{self.binaries['backend']}",
            INTRUDER_ID: f"unix:path:{python}",
            LEGACY_ID: f"unix:path:{self.proxy_python}",
        }
        roles = {
            FRONTEND_ID: "the frontend's sidecars",
            BACKEND_ID: "the backend's sidecar",
            INTRUDER_ID: "any Python program on this node: our stand-in for a rogue workload",
            LEGACY_ID: "spiffe-proxy in front of the legacy service",
        }

        async def create(spiffe_id: str) -> tuple[str, str]:
            out = await self.admin(
                "entry",
                "create",
                "--spiffe-id",
                spiffe_id,
                "--parent-id",
                NODE_ID,
                "--selector",
                self.selectors[spiffe_id],
                "--output",
                "json",
                what=f"create the entry for {spiffe_id}",
            )
            return spiffe_id, str(json.loads(out)["id"])

        self.entries = dict(await asyncio.gather(*(create(spiffe_id) for spiffe_id in self.selectors)))
        for spiffe_id, selector in self.selectors.items():
            say.detail(f"$ spiffe-server entry create --spiffe-id {spiffe_id} --parent-id {NODE_ID} \\")
            say.detail(f"      --selector {selector}")
            say.detail(f"  -> {roles[spiffe_id]}")
        say.ok(f"{len(self.entries)} entries registered: {', '.join(self.entries)}")

    # 4
    async def start_envoy(
        self, name: str, template: str, variables: dict[str, str], *, binary: str | None = None
    ) -> Sidecar:
        """The sidecar ``name``, run through the link of ``binary`` (default ``name``): its identity."""
        say = self.narrator
        envoy_dir = self.workdir / "envoy"
        envoy_dir.mkdir(exist_ok=True)
        config = envoy_dir / f"{name}.yaml"
        assignments = [f"{key}={value}" for key, value in variables.items()]
        await self.supervisor.run(
            [sys.executable, RENDER_PY, template, *assignments, "-o", config],
            what=f"render the {name} sidecar's config",
        )
        say.detail(f"$ python deploy/envoy/render.py {template} {' '.join(assignments)} -o {config.name}")
        admin_path = envoy_dir / f"{name}.admin"
        argv: list[str | Path] = [
            self.binaries[binary or name],
            "-c",
            config,
            "--concurrency",
            "1",
            "--use-dynamic-base-id",  # several Envoys on one host
            "--admin-address-path",
            admin_path,
            "--service-node",
            f"{name}-sidecar",
            "--service-cluster",
            name,
            "-l",
            "info",
        ]
        child = await self.supervisor.start(f"the {name}'s sidecar (envoy)", argv, log_name=f"{name}-envoy")

        def address() -> str | None:
            text = admin_path.read_text().strip() if admin_path.exists() else ""
            if child.process.returncode is not None:
                raise DemoError(f"the {name}'s sidecar exited with code {child.process.returncode}", child)
            return text or None

        admin = EnvoyAdmin(await poll(address, timeout=READY_TIMEOUT, interval=0.02, what="Envoy opened no admin port"))

        def live() -> bool | None:
            if child.process.returncode is not None:
                raise DemoError(f"the {name}'s sidecar exited with code {child.process.returncode}", child)
            return True if admin.ready() else None

        try:
            await poll(live, timeout=READY_TIMEOUT, interval=0.02, what="no certificate arrived")
        except DemoError as err:
            if err.children:
                raise
            raise DemoError(
                f"the {name}'s sidecar got no certificate and trust bundle over SDS within {READY_TIMEOUT:.0f} s",
                child,
                *self.agents(),
            ) from None
        leaf = await asyncio.to_thread(admin.leaf)
        if leaf is None:
            raise DemoError(f"the {name}'s sidecar is live but shows no certificate in /certs", child)
        return Sidecar(child=child, admin=admin, leaf=leaf)

    async def start_service(self, name: str, *argv: str, role: str | None = None) -> tuple[Child, int]:
        """``python -m demo.services <role or name> <argv>``; the child and its port."""
        child = await self.supervisor.start(
            f"the {name} service",
            [sys.executable, "-m", "demo.services", role or name, *argv],
            log_name=name,
            cwd=ROOT,
        )
        line = await child.first_line(timeout=READY_TIMEOUT, what="its port")
        self.services[name] = child
        return child, int(line.rpartition(":")[2])

    async def start_mesh(self) -> None:
        say = self.narrator
        say.step("Start the two services, each behind an Envoy sidecar fed by SDS")
        _, backend_port = await self.start_service("backend")
        say.detail(f"backend service (plain HTTP, knows nothing of TLS) on 127.0.0.1:{backend_port}")
        backend = await self.start_envoy(
            "backend",
            "inbound.yaml.tmpl",
            {
                "AGENT_SOCKET": str(self.agent_socket),
                "ADMIN_PORT": "0",
                "LISTEN_ADDRESS": "127.0.0.1",
                "LISTEN_PORT": "0",
                "APP_PORT": str(backend_port),
                "ALLOWED_SPIFFE_IDS": FRONTEND_ID,
            },
        )
        self.sidecars["backend"] = backend
        inbound_port = await asyncio.to_thread(backend.admin.listener_port, "inbound_mtls")
        say.detail(f"backend sidecar: mTLS on 127.0.0.1:{inbound_port}, lets in {FRONTEND_ID} only")
        frontend = await self.start_envoy(
            "frontend",
            "outbound.yaml.tmpl",
            {
                "AGENT_SOCKET": str(self.agent_socket),
                "ADMIN_PORT": "0",
                "LISTEN_PORT": "0",
                "UPSTREAM_ADDRESS": "127.0.0.1",
                "UPSTREAM_PORT": str(inbound_port),
                "UPSTREAM_SPIFFE_ID": BACKEND_ID,
            },
        )
        self.sidecars["frontend"] = frontend
        outbound_port = await asyncio.to_thread(frontend.admin.listener_port, "outbound_http")
        say.detail(
            f"frontend sidecar: plain HTTP in on 127.0.0.1:{outbound_port}, mTLS out to 127.0.0.1:{inbound_port}, "
            f"which must prove {BACKEND_ID}"
        )
        _, frontend_port = await self.start_service("frontend", "--upstream", f"127.0.0.1:{outbound_port}")
        self.frontend_url = f"http://127.0.0.1:{frontend_port}/"
        say.detail(f"frontend service on 127.0.0.1:{frontend_port}, calls the backend through its sidecar")
        say.detail("each Envoy asked the agent's socket for 'default' (its SVID) and 'ROOTCA' (the bundle);")
        say.detail("the agent identified each Envoy by its executable's path. Envoy's admin /certs now shows:")
        expected = {"frontend": FRONTEND_ID, "backend": BACKEND_ID}
        for name in ("frontend", "backend"):
            sidecar = self.sidecars[name]
            if sidecar.leaf.spiffe_id != expected[name]:
                raise DemoError(
                    f"the {name}'s sidecar got {sidecar.leaf.spiffe_id}, not {expected[name]}", sidecar.child
                )
            say.ok(
                f"{name} sidecar (pid {sidecar.child.pid}) received its certificate over SDS: "
                f"{sidecar.leaf.spiffe_id}, serial {short_serial(sidecar.leaf.serial)}"
            )
            say.detail(f"expires {sidecar.leaf.expires}")

    # 5
    async def request(self) -> None:
        say = self.narrator
        say.step("Call the frontend: frontend -> its sidecar -> mTLS -> backend's sidecar -> backend")
        say.detail(f"$ curl {self.frontend_url}")
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while True:
            try:
                status, document = await asyncio.to_thread(http_get_json, self.frontend_url)
            except (OSError, ValueError) as err:
                status, document = 0, {"error": str(err)}
            backend = document.get("backend", {})
            if status == 200 and backend.get("caller") == FRONTEND_ID:
                break
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the request through the mesh failed: {status} {document}",
                    self.sidecars["frontend"].child,
                    self.sidecars["backend"].child,
                )
            await asyncio.sleep(0.1)
        say.detail(f"backend answered: {backend['message']!r}")
        say.detail("the backend's sidecar told it who called, in the x-forwarded-client-cert header:")
        say.detail(f"  {backend['x-forwarded-client-cert']}")
        say.ok(f"frontend -> backend over mTLS succeeded: the backend saw the caller {backend['caller']}")

    # 6
    async def intruder(self) -> None:
        say = self.narrator
        say.step("An intruder with a valid SVID, but not an allowed SPIFFE ID, calls the backend")
        directory = self.workdir / "intruder"
        directory.mkdir()
        await self.supervisor.run(
            [
                console_script("spiffe-agent"),
                "api",
                "fetch",
                "x509",
                "--socket",
                self.agent_socket,
                "--write",
                directory,
            ],
            what="fetch the intruder's SVID from the Workload API",
        )
        say.detail(f"$ spiffe-agent api fetch x509 --write {directory}   (a Python program: it gets {INTRUDER_ID})")
        cert, key, bundle = (directory / name for name in ("svid.pem", "svid_key.pem", "bundle.pem"))
        try:
            svid = X509SVID.load_pem(cert.read_bytes(), key.read_bytes())
            verified = verify_x509_svid(
                svid.cert_chain,
                X509Bundle.load_pem(TrustDomain.parse(TRUST_DOMAIN), bundle.read_bytes()),
                at=datetime.now(UTC),
            )
        except SpiffeError as err:
            raise DemoError(f"the intruder's SVID is not valid, so it proves nothing: {err}") from err
        if str(verified.id) != INTRUDER_ID:
            raise DemoError(f"the intruder got {verified.id}, not {INTRUDER_ID}", *self.agents())
        say.detail(
            f"its SVID {verified.id} is valid: it chains to the {TRUST_DOMAIN} CA "
            f"(checked with spiffecore.verify_x509_svid), serial {short_serial(svid.leaf.serial_number)}"
        )
        backend = self.sidecars["backend"]
        port = await asyncio.to_thread(backend.admin.listener_port, "inbound_mtls")
        before = ssl_counters(await asyncio.to_thread(backend.admin.stats))
        requests_before = self.backend_requests()
        say.detail(f"it connects straight to the backend's sidecar, 127.0.0.1:{port}, presents that SVID, sends GET /")
        outcome = await asyncio.to_thread(intruder_attempt, port, cert, key, bundle)
        after = ssl_counters(await asyncio.to_thread(backend.admin.stats))
        changed = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
        reasons = [SSL_REASONS[name] for name in changed if name in SSL_REASONS]
        if not reasons:
            raise DemoError(
                f"the intruder was not refused for its identity ({outcome}; TLS counters changed: {changed})",
                backend.child,
            )
        if self.backend_requests() != requests_before:
            raise DemoError("the backend service received the intruder's request", self.services["backend"])
        say.detail(f"the intruder saw: {outcome}")
        say.detail(f"Envoy counted it: {', '.join(f'ssl.{name} +{delta}' for name, delta in changed.items())}")
        say.detail("the backend service never saw the request")
        say.ok(f"intruder {INTRUDER_ID} rejected by the backend's sidecar during the TLS handshake: {reasons[0]}")

    def agents(self) -> tuple[Child, ...]:
        """The agent, for failure messages, once it was started."""
        return (self.agent,) if self.agent is not None else ()

    def backend_requests(self, name: str = "backend") -> int:
        """Requests the service ``name`` logged (one line each on its stderr)."""
        log = self.services[name].stderr_path
        return sum(1 for line in log.read_text(errors="replace").splitlines() if '"GET ' in line)

    # 7
    async def legacy(self) -> None:
        say = self.narrator
        say.step("A legacy plaintext service behind spiffe-proxy: the frontend calls it, the intruder cannot")
        _, legacy_port = await self.start_service("legacy")
        say.detail(f"legacy service on 127.0.0.1:{legacy_port}: plain HTTP, knows nothing of TLS, cannot be changed")
        proxy_argv = [
            "--mode",
            "server",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"127.0.0.1:{legacy_port}",
            "--workload-api",
            f"unix://{self.agent_socket}",
            "--allow-id",
            FRONTEND_ID,
            "--drain-timeout",
            "5",
        ]
        say.detail(f"$ spiffe-proxy {' '.join(proxy_argv[:6])} \\")
        say.detail(f"      {' '.join(proxy_argv[6:])}")
        say.detail(f"  (through {self.proxy_python.parent}/, so the agent gives it {LEGACY_ID})")
        proxy = await self.supervisor.start(
            "spiffe-proxy (the legacy service's)",
            [self.proxy_python, console_script("spiffe-proxy"), *proxy_argv],
            log_name="legacy-proxy",
        )
        line = await proxy.first_line(timeout=READY_TIMEOUT, what="that it is ready")
        match = PROXY_READY.fullmatch(line)
        if match is None:
            raise DemoError(f"unexpected ready line from spiffe-proxy: {line!r}", proxy)
        if match["id"] != LEGACY_ID:
            raise DemoError(f"spiffe-proxy got {match['id']} from the Workload API, not {LEGACY_ID}", proxy)
        proxy_port = match["listen"].rpartition(":")[2]
        say.detail(line)
        sidecar = await self.start_envoy(
            "frontend-legacy",
            "outbound.yaml.tmpl",
            {
                "AGENT_SOCKET": str(self.agent_socket),
                "ADMIN_PORT": "0",
                "LISTEN_PORT": "0",
                "UPSTREAM_ADDRESS": "127.0.0.1",
                "UPSTREAM_PORT": proxy_port,
                "UPSTREAM_SPIFFE_ID": LEGACY_ID,
            },
            binary="frontend",
        )
        self.sidecars["frontend-legacy"] = sidecar
        if sidecar.leaf.spiffe_id != FRONTEND_ID:
            raise DemoError(f"the frontend's second sidecar got {sidecar.leaf.spiffe_id}", sidecar.child)
        outbound_port = await asyncio.to_thread(sidecar.admin.listener_port, "outbound_http")
        say.detail(
            f"the frontend's second outbound sidecar: plain HTTP in on 127.0.0.1:{outbound_port}, mTLS out to the "
            f"proxy, which must prove {LEGACY_ID};\nit runs through the frontend sidecar's path, so it holds "
            f"{FRONTEND_ID} too (over SDS)"
        )
        _, frontend_port = await self.start_service(
            "frontend-2",
            "--upstream",
            f"127.0.0.1:{await asyncio.to_thread(self.sidecars['frontend'].admin.listener_port, 'outbound_http')}",
            "--legacy-upstream",
            f"127.0.0.1:{outbound_port}",
            role="frontend",
        )
        url = f"http://127.0.0.1:{frontend_port}/legacy"
        say.detail(f"a new instance of the frontend, with the legacy service as a second dependency, on {url}")
        say.detail(f"$ curl {url}")
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while True:
            try:
                status, document = await asyncio.to_thread(http_get_json, url)
            except (OSError, ValueError) as err:
                status, document = 0, {"error": str(err)}
            if status == 200 and "legacy" in document:
                break
            if time.monotonic() > deadline:
                raise DemoError(f"the call to the legacy service failed: {status} {document}", sidecar.child, proxy)
            await asyncio.sleep(0.1)
        accepted = [record.get("spiffe_id") for record in log_records(proxy.stderr_path, "connection accepted")]
        if accepted[-1:] != [FRONTEND_ID]:
            raise DemoError(f"spiffe-proxy did not log accepting {FRONTEND_ID}: {accepted}", proxy)
        say.detail(f"legacy service answered: {document['legacy']['message']!r}")
        say.detail(f"spiffe-proxy logged: connection accepted, spiffe_id {FRONTEND_ID}")
        say.ok(f"frontend -> legacy service through spiffe-proxy succeeded: the proxy let in {FRONTEND_ID}")

        directory = self.workdir / "intruder"
        cert, key, bundle = (directory / name for name in ("svid.pem", "svid_key.pem", "bundle.pem"))
        requests_before = self.backend_requests("legacy")
        say.detail(f"the intruder ({INTRUDER_ID}, step 6) connects straight to spiffe-proxy, 127.0.0.1:{proxy_port}")
        outcome = await asyncio.to_thread(intruder_attempt, int(proxy_port), cert, key, bundle, server="spiffe-proxy")

        def rejected() -> dict[str, Any] | None:
            records = log_records(proxy.stderr_path, "connection rejected")
            return next((r for r in records if r.get("spiffe_id") == INTRUDER_ID), None)

        try:
            record = await poll(
                rejected, timeout=REQUEST_TIMEOUT, interval=0.05, what="spiffe-proxy logged no rejection"
            )
        except DemoError as err:
            raise DemoError(f"{err} (the intruder saw: {outcome})", proxy) from None
        if self.backend_requests("legacy") != requests_before:
            raise DemoError("the legacy service received the intruder's request", self.services["legacy"])
        say.detail(f"the intruder saw: {outcome}")
        say.detail(f"spiffe-proxy logged: connection rejected, {record.get('reason')}")
        say.detail("the legacy service never saw the request")
        say.ok(
            f"intruder {INTRUDER_ID} rejected by spiffe-proxy during the TLS handshake: "
            "its SPIFFE ID is not one the proxy allows"
        )

    # 8
    async def update_ttl(self, entry_id: str, ttl: int) -> None:
        """``spiffe-server entry update`` with a new X.509 TTL, sent straight to the registration API.

        In-process rather than the CLI, so the rotation's measured time holds no Python start-up.
        """
        try:
            async with grpc.aio.insecure_channel(f"unix:{self.admin_socket}") as channel:
                stub = registration_pb2_grpc.RegistrationAPIStub(channel)
                entry = await stub.GetEntry(registration_pb2.GetEntryRequest(id=entry_id), timeout=REQUEST_TIMEOUT)
                entry.x509_svid_ttl = ttl
                await stub.UpdateEntry(registration_pb2.UpdateEntryRequest(entry=entry), timeout=REQUEST_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            raise DemoError(f"cannot update the backend's entry: {err.code().name}: {err.details()}") from err

    async def rotation(self) -> None:
        say = self.narrator
        say.step("Rotate the backend's certificate live, under traffic")
        backend = self.sidecars["backend"]
        old = backend.leaf.serial
        traffic = Traffic(self.frontend_url, interval=0.0)
        say.detail(f"requests flow frontend -> backend without pause; the backend's serial is {short_serial(old)}")
        say.detail(f"the backend's entry gets a new X.509 TTL, {ROTATED_TTL} s, as with")
        say.detail(f"$ spiffe-server entry update {self.entries[BACKEND_ID]} --spiffe-id {BACKEND_ID} \\")
        say.detail(f"      --parent-id {NODE_ID} --selector {self.selectors[BACKEND_ID]} --x509-ttl {ROTATED_TTL}")
        say.detail("(sent here straight to the registration API, so the clock below measures no Python start-up);")
        say.detail("the server streams the change to the agent, which signs a new SVID and pushes it over SDS")

        def new_leaf() -> tuple[Leaf, float] | None:
            leaf = backend.admin.leaf()
            return (leaf, time.monotonic()) if leaf is not None and leaf.serial != old else None

        async with background(traffic.run()):
            await asyncio.sleep(0.5)
            watcher = asyncio.create_task(
                poll(new_leaf, timeout=ROTATION_TIMEOUT, interval=0.001, what="Envoy showed no new certificate")
            )
            try:
                started = time.monotonic()
                await self.update_ttl(self.entries[BACKEND_ID], ROTATED_TTL)
                leaf, seen = await watcher
            except DemoError as err:
                raise DemoError(str(err), backend.child, *self.agents()) from None
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, DemoError):
                    await watcher
            requests_at_rotation = traffic.ok
            await asyncio.sleep(1.0)
        backend.leaf = leaf
        if traffic.failures:
            raise DemoError(
                f"{len(traffic.failures)} of {traffic.ok + len(traffic.failures)} requests failed during the rotation, "
                f"the first: {traffic.failures[0]}",
                self.sidecars["frontend"].child,
                backend.child,
            )
        if traffic.ok <= requests_at_rotation:
            raise DemoError("no request succeeded after the rotation", backend.child)
        say.detail(
            f"new serial {short_serial(leaf.serial)} live in the backend's Envoy (admin /certs) "
            f"{(seen - started) * 1000:.0f} ms after the update was sent"
        )
        say.detail(f"expires {leaf.expires}: the agent now renews it by itself about every {ROTATED_TTL // 2} s")
        total = traffic.ok + len(traffic.failures)
        say.ok(
            f"rotation seen live in {(seen - started) * 1000:.0f} ms: serial {short_serial(old)} -> "
            f"{short_serial(leaf.serial)}; {total} requests meanwhile, {len(traffic.failures)} failed"
        )

    # then
    async def keep_running(self, duration: float | None) -> None:
        say = self.narrator
        if duration is None:
            say.say(
                "\nAll steps done. The mesh keeps running: a request a second, a line a minute. "
                "Press Ctrl-C to stop everything."
            )
        else:
            say.say(f"\nAll steps done. The mesh keeps running for {duration:g} s (--duration), then stops.")
        say.phase = "the running mesh, after the steps"
        traffic = Traffic(self.frontend_url, interval=1.0)
        backend = self.sidecars["backend"]
        started = time.monotonic()
        next_report = started + REPORT_EVERY
        serials = {backend.leaf.serial}
        reported = (0, 0)
        async with background(traffic.run()):
            while duration is None or time.monotonic() - started < duration:
                leaf = await asyncio.to_thread(backend.admin.leaf)
                if leaf is not None:
                    serials.add(leaf.serial)
                if time.monotonic() >= next_report:
                    ok, failed = traffic.ok - reported[0], len(traffic.failures) - reported[1]
                    reported = (traffic.ok, len(traffic.failures))
                    minutes = round((time.monotonic() - started) / 60)
                    say.say(
                        f"[{datetime.now():%H:%M:%S}] running {minutes} min: {ok} requests in the last minute, "
                        f"{failed} failed; backend serial {short_serial(leaf.serial) if leaf else '?'}, "
                        f"renewed by the agent on its own {len(serials) - 1} time(s) so far"
                    )
                    next_report += REPORT_EVERY
                remaining = 1.0 if duration is None else duration - (time.monotonic() - started)
                await asyncio.sleep(max(0.0, min(1.0, remaining)))


# --- running it ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Run spiffe-sidecar on this machine: control plane, agent, two services behind Envoy "
        "sidecars and a legacy one behind spiffe-proxy; mTLS, an intruder refused, a live rotation. "
        "Ctrl-C stops everything.",
    )
    parser.add_argument("--duration", type=float, metavar="SECONDS", help="stop by itself after the steps and SECONDS")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    parser.add_argument("--quiet", action="store_true", help="print only the results, not the details")
    parser.add_argument(
        "--pause", type=float, default=1.0, metavar="SECONDS", help="pause between the steps (default 1)"
    )
    args = parser.parse_args(argv)
    if args.duration is not None and args.duration < 0:
        parser.error("--duration must not be negative")
    if args.pause < 0:
        parser.error("--pause must not be negative")
    return args


def report_failure(narrator: Narrator, err: DemoError, err_out: TextIO) -> None:
    print(f"\nFAILED at {narrator.phase}: {err}", file=err_out, flush=True)
    for child in err.children:
        tail = child.tail()
        print(f"--- last lines of {child.name}'s log ({child.stderr_path}):", file=err_out)
        print(tail or "(empty)", file=err_out, flush=True)


async def amain(args: argparse.Namespace, out: TextIO, err_out: TextIO) -> int:
    narrator = Narrator(out=out, quiet=args.quiet, pause_seconds=args.pause)
    workdir = Path(tempfile.mkdtemp(prefix="spiffe-demo-"))
    narrator.say(f"spiffe-sidecar demo, working in {workdir}" + (" (kept)" if args.keep else " (removed at the end)"))
    supervisor = Supervisor(workdir)
    demo = Demo(workdir, supervisor, narrator)
    loop = asyncio.get_running_loop()
    signalled: list[signal.Signals] = []
    stop = asyncio.Event()

    def on_signal(received: signal.Signals) -> None:
        signalled.append(received)
        stop.set()

    for received in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(received, on_signal, received)
    scenario = asyncio.create_task(demo.run(args.duration))
    stopped = asyncio.create_task(stop.wait())
    crashed = asyncio.create_task(supervisor.crashed())
    code = 0
    try:
        await asyncio.wait({scenario, stopped, crashed}, return_when=asyncio.FIRST_COMPLETED)
        if scenario.done():
            scenario.result()  # raises the step's DemoError
            narrator.say(f"\nStopping after {args.duration:g} s (--duration).")
        elif crashed.done():
            child = crashed.result()
            raise DemoError(f"{child.name} exited unexpectedly with code {child.process.returncode}", child)
        else:
            name = signalled[0].name if signalled else "a signal"
            if demo.steps_done:
                narrator.say(f"\nStopping ({name}).")
            else:
                narrator.say(f"\nInterrupted ({name}) during step {narrator.step_number}; stopping.")
                code = 130
    except DemoError as error:
        report_failure(narrator, error, err_out)
        code = 1
    finally:
        for task in (scenario, stopped, crashed):
            task.cancel()
        await asyncio.gather(scenario, stopped, crashed, return_exceptions=True)
        clean = await supervisor.stop_all(narrator.detail)
        if args.keep:
            narrator.say(f"Kept {workdir} (configs in it, logs in {workdir / 'logs'}).")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        for received in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(received)
    if not clean:
        print("Some processes did not stop cleanly (see above).", file=err_out, flush=True)
        return code or 1
    narrator.say("Everything stopped cleanly." if code != 1 else "Everything stopped.")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(amain(args, sys.stdout, sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
