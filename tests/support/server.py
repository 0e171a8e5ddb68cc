"""Real ``spiffe-server`` processes for tests: start, wait for readiness, administer, stop.

:func:`start_server` runs ``spiffe-server run`` (the console script beside ``sys.executable``) on
127.0.0.1 with an OS-assigned port and waits for its one ``spiffe-server ready: ...`` line on
stdout. :class:`ServerProcess` runs the administration CLI against the server's admin socket (as
a separate process, synchronously or from async tests without blocking the loop), and
:meth:`ServerProcess.stop` sends SIGTERM and checks for a prompt exit with code 0. Everything the
server wrote to stderr goes into failure messages.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from spiffecore import SpiffeBundle, TrustDomain
from tests.support.process import start_until_ready

TRUST_DOMAIN: Final = "example.org"
READY_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0
PROMPT_EXIT: Final = 3.0
CLI_TIMEOUT: Final = 60.0
READY_RE: Final = re.compile(
    r"spiffe-server ready: trust domain (?P<td>\S+), agent API on (?P<host>[^\s,]+):(?P<port>\d+), "
    r"admin socket (?P<socket>.+)"
)


def script(name: str = "spiffe-server") -> str:
    """The console script installed beside this interpreter."""
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found is not None, f"{name} is not installed beside {sys.executable}"
    return found


@dataclass(frozen=True)
class CLIResult:
    """A finished CLI process."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> Any:
        assert self.returncode == 0, self.describe()
        return json.loads(self.stdout)

    def describe(self) -> str:
        return f"{' '.join(self.argv)} exited {self.returncode}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def run_cli(*argv: str) -> CLIResult:
    """Run ``spiffe-server <argv>`` to completion."""
    command = (script(), *argv)
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False)  # noqa: S603
    return CLIResult(command, done.returncode, done.stdout, done.stderr, time.monotonic() - started)


async def run_cli_async(*argv: str) -> CLIResult:
    """Run ``spiffe-server <argv>`` to completion without blocking the event loop."""
    command = (script(), *argv)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(CLI_TIMEOUT):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return CLIResult(command, process.returncode, stdout.decode(), stderr.decode(), time.monotonic() - started)


@dataclass
class ServerProcess:
    """A running ``spiffe-server run``."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    admin_socket: Path
    address: str
    trust_domain: TrustDomain
    stderr_path: Path
    _stderr: IO[bytes] = field(repr=False)
    _stdout: IO[bytes] = field(repr=False)
    _roots: bytes | None = field(default=None, repr=False)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def _admin(self, argv: Sequence[str]) -> tuple[str, ...]:
        return (*argv, "--admin-socket", str(self.admin_socket))

    def cli(self, *argv: str, check: bool = True) -> CLIResult:
        """Run an admin command (``entry create ...``) against this server."""
        result = run_cli(*self._admin(argv))
        if check:
            assert result.returncode == 0, result.describe()
        return result

    async def acli(self, *argv: str, check: bool = True) -> CLIResult:
        result = await run_cli_async(*self._admin(argv))
        if check:
            assert result.returncode == 0, result.describe()
        return result

    def cli_json(self, *argv: str) -> Any:
        return self.cli(*argv, "--output", "json").json()

    async def acli_json(self, *argv: str) -> Any:
        return (await self.acli(*argv, "--output", "json")).json()

    def token(self, *argv: str) -> str:
        token: str = self.cli_json("token", "generate", *argv)["token"]
        return token

    async def atoken(self, *argv: str) -> str:
        token: str = (await self.acli_json("token", "generate", *argv))["token"]
        return token

    def bundle(self) -> SpiffeBundle:
        """``bundle show --format spiffe``, parsed."""
        return SpiffeBundle.parse(self.trust_domain, self.cli("bundle", "show", "--format", "spiffe").stdout)

    def roots_pem(self, *, fresh: bool = False) -> bytes:
        """``bundle show`` (PEM roots): what an agent is bootstrapped with. Cached unless ``fresh``."""
        if self._roots is None or fresh:
            self._roots = self.cli("bundle", "show").stdout.encode()
        return self._roots

    def entry_count(self) -> int:
        return int(self.cli("entry", "count").stdout)

    def stop(self, *, timeout: float = STOP_TIMEOUT, prompt: float = PROMPT_EXIT) -> float:
        """SIGTERM; the server must exit with 0 within ``prompt`` seconds. Returns how long it took."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"spiffe-server did not exit within {timeout}s of SIGTERM\n{self.stderr}") from None
        finally:
            self._close_files()
        elapsed = time.monotonic() - started
        assert code == 0, f"spiffe-server exited {code} after SIGTERM\n{self.stderr}"
        assert elapsed < prompt, f"spiffe-server took {elapsed:.2f}s to exit after SIGTERM\n{self.stderr}"
        return elapsed

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._close_files()

    def _close_files(self) -> None:
        self._stderr.close()
        self._stdout.close()
        shutil.rmtree(self.admin_socket.parent, ignore_errors=True)


def start_server(
    data_dir: Path,
    *,
    trust_domain: str = TRUST_DOMAIN,
    config: Path | None = None,
    database_url: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = READY_TIMEOUT,
) -> ServerProcess:
    """Start ``spiffe-server run`` with its state in ``data_dir``; return once it says it is ready."""
    data_dir.mkdir(parents=True, exist_ok=True)
    logs = data_dir.parent / f"{data_dir.name}-logs"
    logs.mkdir(exist_ok=True)
    # A short socket path: unix socket paths are limited to 107 bytes, tmp_path can be longer.
    admin_socket = Path(f"/tmp/spiffe-test-{os.getpid()}-{time.monotonic_ns()}/admin.sock")  # noqa: S108
    argv = [script(), "run", "--data-dir", str(data_dir), "--bind", "127.0.0.1:0", "--admin-socket", str(admin_socket)]
    if config is not None:
        argv += ["--config", str(config)]
    else:
        argv += ["--trust-domain", trust_domain]
    if database_url is not None:
        argv += ["--database-url", database_url]
    argv += extra
    started = start_until_ready(argv, logs=logs, name="spiffe-server", ready=READY_RE, timeout=timeout)
    match = started.ready
    return ServerProcess(
        process=started.process,
        data_dir=data_dir,
        admin_socket=Path(match["socket"]),
        address=f"{match['host']}:{match['port']}",
        trust_domain=TrustDomain.parse(match["td"]),
        stderr_path=started.stderr_path,
        _stderr=started.stderr,
        _stdout=started.stdout,
    )


@contextmanager
def running_server(data_dir: Path, **options: Any) -> Iterator[ServerProcess]:
    """A server for the ``with`` block; stopped with SIGTERM (and checked) at its end."""
    server = start_server(data_dir, **options)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()
        else:
            server._close_files()
