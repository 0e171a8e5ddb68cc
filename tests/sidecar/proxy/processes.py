"""``spiffe-proxy`` as real processes that an agent tells apart, for the end-to-end tests.

An agent's ``unix`` attestor sees every proxy a test starts as the same user running the same
Python, so one entry would give them all the same SPIFFE ID. :func:`python_at` gives this
interpreter a path of its own (a hard link in a virtual environment that shares this one's
packages): a proxy started through it has that path as ``/proc/<pid>/exe``, and an entry with the
selector ``unix:path:<that path>`` (agent option ``discover_workload_path``) is its alone.

:func:`start_proxy` runs the ``spiffe-proxy`` console script with such an interpreter, waits for
its ready line and returns a :class:`ProxyProcess`; :meth:`ProxyProcess.stop` sends SIGTERM and
returns the exit code.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tests.support.process import Started, start_until_ready
from tests.support.server import script

READY: Final = re.compile(
    r"spiffe-proxy ready: (?P<mode>server|client) mode, listening on (?P<listen>\S+), "
    r"upstream (?P<upstream>\S+), identity (?P<id>spiffe://[^,\s]+)(, status http://(?P<status>\S+))?"
)
READY_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 30.0


def python_at(directory: Path) -> Path:
    """This interpreter under a path of its own (inside ``directory``), with this environment's packages."""
    real = Path(sys.executable).resolve()
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True)
    clone = bin_dir / real.name
    try:
        clone.hardlink_to(real)
    except OSError:  # another file system, or a file not ours to link
        shutil.copy2(real, clone)
    (directory / "pyvenv.cfg").write_text(f"home = {real.parent}\ninclude-system-site-packages = false\n")
    site = directory / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    site.parent.mkdir(parents=True)
    site.symlink_to(sysconfig.get_paths()["purelib"])
    return clone.resolve()


@dataclass
class ProxyProcess:
    """A running ``spiffe-proxy`` that printed its ready line."""

    started: Started

    @property
    def listen(self) -> str:
        """host:port (or unix:/path), as the ready line says."""
        return self.started.ready["listen"]

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def spiffe_id(self) -> str:
        return self.started.ready["id"]

    @property
    def status(self) -> str:
        status = self.started.ready["status"]
        assert status is not None, "this proxy was started without --status"
        return status

    @property
    def stderr(self) -> str:
        return self.started.stderr_path.read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        """Its JSON log lines so far."""
        return [json.loads(line) for line in self.stderr.splitlines() if line.startswith("{")]

    def logged(self, message: str) -> list[dict[str, Any]]:
        return [line for line in self.logs() if line.get("msg") == message]

    def wait_logged(self, message: str, *, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The log lines with ``message``, once there is one (a peer may see the outcome first)."""
        deadline = time.monotonic() + timeout
        while not (found := self.logged(message)):
            assert time.monotonic() < deadline, f"no {message!r} log line within {timeout} s\n{self.stderr[-4000:]}"
            time.sleep(0.02)
        return found

    def stop(self) -> int:
        """SIGTERM (graceful drain), then the exit code; killed if it does not exit in time."""
        process = self.started.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(STOP_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            self.started.stdout.close()
            self.started.stderr.close()


def start_proxy(python: Path, argv: Sequence[str], *, logs: Path, name: str = "spiffe-proxy") -> ProxyProcess:
    """``spiffe-proxy <argv>`` run by ``python`` (see :func:`python_at`); returns once it is ready."""
    command = [str(python), script("spiffe-proxy"), *argv]
    return ProxyProcess(start_until_ready(command, logs=logs, name=name, ready=READY, timeout=READY_TIMEOUT))
