"""The proxy as a running process: identity source, TLS, listener, status endpoint, signals, drain.

This is the composition root of ``spiffe-proxy`` inside :mod:`sidecar.proxy`. It knows no gRPC:
a Workload API source is handed in by the caller (``open_workload_source``), since the Workload
API client lives outside the proxy's allowed imports; the files source is built here.

Phases: load the identity (the first one is awaited, bounded), listen, serve ``--status``, print
the ready line; then, on SIGTERM or SIGINT, stop accepting, drain the connections in flight up to
the drain deadline, and return. SIGHUP re-reads the identity files and the policy file now.

The policy file (``--policy``) is followed like the identity files (:class:`~sidecar.proxy.source.FileWatch`:
polled, and at once on SIGHUP). A good new file becomes the authorizer of new connections in one
reference swap (:class:`~sidecar.proxy.tls.ProxyTLS`); connections already made are not judged
again. A bad one is logged with its reason and counted, and the policy in force stays. The policy
in force is logged at start and after every reload.

With ``--workers N`` this class runs in each worker process (``worker`` set: the listening socket
has SO_REUSEPORT, on the port the parent reserved, and no status endpoint); the parent is
:class:`sidecar.proxy.workers.Supervisor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Literal

from prometheus_client import CollectorRegistry

from sidecar.proxy.address import Address, check_plaintext
from sidecar.proxy.client import ProxyClient
from sidecar.proxy.errors import ProxyConfigError
from sidecar.proxy.listener import Listener
from sidecar.proxy.metrics import ProxyMetrics, readiness
from sidecar.proxy.policy import Policy
from sidecar.proxy.policyfile import load_policy_file
from sidecar.proxy.relay import Timeouts
from sidecar.proxy.server import ProxyServer
from sidecar.proxy.source import DEFAULT_POLL_INTERVAL, FileWatch, PEMFiles, file_source
from sidecar.proxy.tls import ProxyTLS
from sidecar.workload.source import X509Source
from spiffecore import SpiffeError
from spiffeops.lifecycle import wait_for_shutdown_signal
from spiffeops.status import StatusServer

__all__ = ["OpenWorkloadSource", "ProxyApp", "ProxyConfig", "UpstreamProbe", "start_status"]

IDENTITY_TIMEOUT: Final = 30.0
PROBE_TIMEOUT: Final = 0.5
PROBE_CACHE: Final = 1.0

OpenWorkloadSource = Callable[[str | None], AbstractAsyncContextManager[X509Source]]
"""Opens a started :class:`X509Source` over the Workload API at an address (None: the environment's)."""

_log = logging.getLogger("spiffe-proxy")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """Everything ``spiffe-proxy`` is told on its command line, checked when built.

    Exactly one identity source: ``workload_api`` (an address, or ``""`` for
    ``SPIFFE_ENDPOINT_SOCKET``) or the three files ``cert``, ``key`` and ``bundle``. ``policy`` is
    the rules of the flags, or those ``policy_file`` has for ``listen`` when it was read.
    ``workers`` above 1 asks for that many processes sharing a TCP port (SO_REUSEPORT);
    ``worker`` (an index) and ``worker_port`` are set in each of those processes.
    """

    mode: Literal["server", "client"] = "server"
    listen: Address
    upstream: Address
    policy: Policy
    workload_api: str | None = None
    cert: Path | None = None
    key: Path | None = None
    bundle: Path | None = None
    status: tuple[str, int] | None = None
    max_connections: int = 0
    proxy_protocol: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    drain_timeout: float = 30.0
    unsafe_listen: bool = False
    unsafe_upstream: bool = False
    identity_timeout: float = IDENTITY_TIMEOUT
    policy_file: Path | None = None
    policy_poll_interval: float = DEFAULT_POLL_INTERVAL
    workers: int = 1
    worker: int | None = None
    worker_port: int = 0

    def __post_init__(self) -> None:
        self.policy.authorizer()  # no rule: ProxyConfigError, in either mode (fail closed)
        files = (self.cert, self.key, self.bundle)
        if self.workload_api is not None and any(f is not None for f in files):
            raise ProxyConfigError("--workload-api and --cert/--key/--bundle cannot be combined: choose one source")
        if self.workload_api is None and not all(f is not None for f in files):
            if any(f is not None for f in files):
                raise ProxyConfigError("--cert, --key and --bundle go together: all three are required")
            raise ProxyConfigError(
                "an identity source is required: --workload-api (or SPIFFE_ENDPOINT_SOCKET), "
                "or --cert, --key and --bundle"
            )
        if self.mode == "server":
            check_plaintext(
                self.upstream, role="upstream", unsafe_flag="--unsafe-upstream", allow_unsafe=self.unsafe_upstream
            )
        else:
            check_plaintext(
                self.listen, role="listen address", unsafe_flag="--unsafe-listen", allow_unsafe=self.unsafe_listen
            )
            if self.proxy_protocol:
                raise ProxyConfigError("--proxy-protocol is for server mode (it goes to the plaintext upstream)")
        if self.max_connections < 0:
            raise ProxyConfigError("--max-conns must be 0 (no limit) or more", self.max_connections)
        if self.drain_timeout < 0:
            raise ProxyConfigError("--drain-timeout cannot be negative", self.drain_timeout)
        if self.workers < 1:
            raise ProxyConfigError("--workers must be 1 or more", self.workers)
        if self.workers > 1 and self.listen.is_unix:
            raise ProxyConfigError(
                "--workers above 1 needs a TCP --listen address: processes cannot share a unix socket "
                "with SO_REUSEPORT",
                str(self.listen),
            )
        if self.worker is not None and (self.listen.is_unix or self.status is not None):
            raise ProxyConfigError("a worker listens on a TCP port and serves no --status (its parent does)")

    @property
    def bind(self) -> Address:
        """The address the listening socket binds: ``listen``, or in a worker its parent's port."""
        if self.worker is None:
            return self.listen
        return replace(self.listen, port=self.worker_port)

    @property
    def files(self) -> PEMFiles | None:
        if self.cert is None or self.key is None or self.bundle is None:
            return None
        return PEMFiles(cert=self.cert, key=self.key, bundle=self.bundle)


class UpstreamProbe:
    """Is the upstream accepting TCP (or unix) connections? A connect with a short timeout, its
    answer kept for a second so a busy ``/readyz`` does not hammer the upstream. Thread-safe."""

    def __init__(self, upstream: Address, *, timeout: float = PROBE_TIMEOUT, cache: float = PROBE_CACHE) -> None:
        self.upstream = upstream
        self.timeout = timeout
        self.cache = cache
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._reachable = False

    def __call__(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= self.cache:
                self._reachable = self._connect()
                self._checked_at = time.monotonic()
            return self._reachable

    def _connect(self) -> bool:
        try:
            if self.upstream.is_unix:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(self.timeout)
                    sock.connect(self.upstream.path)
            else:
                with socket.create_connection((self.upstream.host, self.upstream.port), timeout=self.timeout):
                    pass
        except OSError:
            return False
        return True


def start_status(
    address: tuple[str, int], readiness: Callable[[], tuple[bool, str]], registry: CollectorRegistry
) -> StatusServer:
    """Serve ``/healthz``, ``/readyz`` and ``/metrics`` at ``--status``; a taken or bad address is a
    :class:`ProxyConfigError` naming it."""
    host, port = address
    status = StatusServer(host, port, readiness=readiness, registry=registry)
    try:
        status.start()
    except OSError as err:
        raise ProxyConfigError(f"cannot serve --status ({err.strerror or err})", f"{host}:{port}") from err
    return status


class ProxyApp:
    """One ``spiffe-proxy`` process. :meth:`run` returns after a graceful drain."""

    def __init__(self, config: ProxyConfig, *, open_workload_source: OpenWorkloadSource | None = None) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = ProxyMetrics(self.registry)
        self._open_workload_source = open_workload_source

    def _source(self, files: PEMFiles | None) -> AbstractAsyncContextManager[X509Source]:
        if files is not None:
            files.load()  # a bad file is a configuration error, reported before anything starts
            return file_source(files)
        if self._open_workload_source is None:
            raise ProxyConfigError("this build of the proxy has no Workload API client: use --cert/--key/--bundle")
        return self._open_workload_source(self.config.workload_api or None)

    async def run(self, announce: Callable[[str], None]) -> None:
        config = self.config
        files = config.files
        policy_watch, policy = self._policy()
        async with self._source(files) as source:
            await source.ready(config.identity_timeout)
            tls = ProxyTLS(source, policy.authorizer(), server_side=config.mode == "server")
            listener = self._listener(tls)
            await listener.start()
            self._log_policy("policy in force", policy)
            loop = asyncio.get_running_loop()
            follower = loop.create_task(self._follow(source))
            policy_follower = None
            if policy_watch is not None:
                policy_follower = loop.create_task(self._follow_policy(policy_watch, tls, policy))
            # SIGHUP's default would kill us: a handler is there for the process's whole life.
            loop.add_signal_handler(signal.SIGHUP, self._reload, files, policy_watch)
            status = self._status(source)
            try:
                announce(self._ready_line(listener, source, status))
                received = await wait_for_shutdown_signal()
                _log.info(
                    "shutting down: draining connections",
                    extra={
                        "signal": received.name,
                        "connections": listener.connections,
                        "drain_timeout": config.drain_timeout,
                    },
                )
                await listener.drain(config.drain_timeout)
            finally:
                loop.remove_signal_handler(signal.SIGHUP)
                for task in (follower, policy_follower):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                await listener.drain(0.0)
                if status is not None:
                    status.stop()
        _log.info("stopped")

    def _policy(self) -> tuple[FileWatch | None, Policy]:
        """The policy to start with, and the watch of its file (None: the flags' rules, fixed)."""
        config = self.config
        if config.policy_file is None:
            return None, config.policy
        watch = FileWatch((config.policy_file,), config.policy_poll_interval)  # its stamp first, then read
        return watch, load_policy_file(config.policy_file).for_listener(config.listen)

    def _log_policy(self, message: str, policy: Policy) -> None:
        extra: dict[str, object] = {"listen": str(self.config.listen), "policy": str(policy)}
        if self.config.policy_file is not None:
            extra["policy_file"] = str(self.config.policy_file)
        _log.info(message, extra=extra)

    async def _follow_policy(self, watch: FileWatch, tls: ProxyTLS, policy: Policy) -> None:
        """Read the policy file again after each change (or SIGHUP); new connections follow it."""
        path = self.config.policy_file
        assert path is not None
        while True:
            await watch.changed()
            try:
                new = load_policy_file(path).for_listener(self.config.listen)
            except ProxyConfigError as err:
                self.metrics.policy_reloaded(ok=False)
                _log.error(
                    "reloading the policy file failed; keeping the policy in force",
                    extra={"policy_file": str(path), "reason": str(err), "policy": str(policy)},
                )
                continue
            tls.authorizer = new.authorizer()  # one reference: the next connection's verify callback
            policy = new
            self.metrics.policy_reloaded(ok=True)
            self._log_policy("policy reloaded", policy)

    def _listener(self, tls: ProxyTLS) -> Listener:
        config = self.config
        reuse_port = config.worker is not None
        if config.mode == "server":
            return ProxyServer(
                listen=config.bind,
                upstream=config.upstream,
                tls=tls,
                timeouts=config.timeouts,
                max_connections=config.max_connections,
                allow_unsafe_upstream=config.unsafe_upstream,
                metrics=self.metrics,
                proxy_protocol=config.proxy_protocol,
                reuse_port=reuse_port,
            )
        return ProxyClient(
            listen=config.bind,
            upstream=config.upstream,
            tls=tls,
            timeouts=config.timeouts,
            max_connections=config.max_connections,
            allow_unsafe_listen=config.unsafe_listen,
            metrics=self.metrics,
            reuse_port=reuse_port,
        )

    def _status(self, source: X509Source) -> StatusServer | None:
        if self.config.status is None:
            return None
        probe = UpstreamProbe(self.config.upstream)

        def ready() -> tuple[bool, str]:
            try:
                source.svid()
                loaded = True
            except SpiffeError:
                loaded = False
            return readiness(loaded, probe())

        return start_status(self.config.status, ready, self.registry)

    async def _follow(self, source: X509Source) -> None:
        """Count identity rotations and keep the expiry gauge current."""
        updates: AsyncIterator[object] = source.updates()
        first = True
        async for _ in updates:
            svid = source.svid()
            if first:
                self.metrics.identity_loaded(svid.expires_at)
                first = False
            else:
                self.metrics.identity_rotated(svid.expires_at)
                _log.info(
                    "identity rotated",
                    extra={"spiffe_id": str(svid.id), "expires_at": svid.expires_at.isoformat()},
                )

    @staticmethod
    def _reload(files: PEMFiles | None, policy: FileWatch | None) -> None:
        if files is None:
            _log.info("SIGHUP: the Workload API pushes new identities by itself")
        else:
            _log.info("SIGHUP: reloading the identity files")
            files.reload()
        if policy is not None:
            _log.info("SIGHUP: reloading the policy file")
            policy.poke()

    def _ready_line(self, listener: Listener, source: X509Source, status: StatusServer | None) -> str:
        config = self.config
        line = (
            f"spiffe-proxy ready: {config.mode} mode, listening on {listener.bound}, upstream {config.upstream}, "
            f"identity {source.svid().id}"
        )
        if status is not None:
            host, port = status.address
            line += f", status http://{Address(host=host, port=port)}"
        return line
