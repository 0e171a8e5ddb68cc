"""Real ``spiffe-agent`` processes for tests: start, wait for the ready line, run workloads, stop.

:func:`start_agent` runs ``spiffe-agent run`` (the console script beside ``sys.executable``) against
a server and waits for its one ``spiffe-agent ready: <agent ID> serving the Workload API on <socket>``
line on stdout. :meth:`AgentProcess.stop` sends SIGTERM and checks for a prompt exit with code 0.
:func:`run_agent_cli` runs the workload commands (``spiffe-agent api ...``, ``healthcheck``) as
separate processes, and :func:`run_workload` runs a Python program as a workload, optionally as
another user.

Sockets live under :func:`socket_dir`, a short directory in ``/tmp`` that every user may enter:
unix socket paths are limited to 107 bytes, and workloads running as other users must reach it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from spiffecore import SpiffeID
from tests.support.process import start_until_ready
from tests.support.server import CLIResult, ServerProcess, script

READY_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0
PROMPT_EXIT: Final = 3.0
CLI_TIMEOUT: Final = 60.0
WORKLOAD_TIMEOUT: Final = 60.0
READY_RE: Final = re.compile(r"spiffe-agent ready: (?P<id>\S+) serving the Workload API on (?P<socket>.+)")

# Workload programs call drop_ids() after their imports and before they connect: this venv's
# interpreter lives under /root, which other users cannot enter, so a program that must run as
# another user starts as root, imports what it needs, then gives up its ids (TEST_DROP_IDS=uid:gid).
DROP_IDS: Final = r"""
import os as _os


def drop_ids():
    spec = _os.environ.get("TEST_DROP_IDS")
    if spec:
        uid, gid = (int(part) for part in spec.split(":"))
        _os.setgroups([])
        _os.setgid(gid)
        _os.setuid(uid)
"""


def agent_script() -> str:
    return script("spiffe-agent")


def socket_dir(prefix: str = "spiffe-agent-test") -> Path:
    """A new short directory in /tmp that every user may enter (0755)."""
    directory = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    directory.chmod(0o755)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_roots(server: ServerProcess, path: Path) -> Path:
    """The server's PEM roots in ``path``: an agent's ``--trust-bundle``."""
    path.write_bytes(server.roots_pem())
    return path


def endpoint_env(endpoint: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**(os.environ if base is None else base), "SPIFFE_ENDPOINT_SOCKET": endpoint}


def run_agent_cli(*argv: str, env: Mapping[str, str] | None = None, timeout: float = CLI_TIMEOUT) -> CLIResult:
    """Run ``spiffe-agent <argv>`` to completion."""
    command = (agent_script(), *argv)
    started = time.monotonic()
    done = subprocess.run(  # noqa: S603 - our own console script
        command, capture_output=True, text=True, timeout=timeout, check=False, env=None if env is None else dict(env)
    )
    return CLIResult(command, done.returncode, done.stdout, done.stderr, time.monotonic() - started)


async def run_agent_cli_async(
    *argv: str, env: Mapping[str, str] | None = None, timeout: float = CLI_TIMEOUT
) -> CLIResult:
    """Run ``spiffe-agent <argv>`` to completion without blocking the event loop."""
    command = (agent_script(), *argv)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else dict(env),
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return CLIResult(command, process.returncode, stdout.decode(), stderr.decode(), time.monotonic() - started)


def http_get(url: str, *, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``url``: the status code and the body, also for error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a test's own http URL
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@dataclass
class AgentProcess:
    """A running ``spiffe-agent run``."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    socket: Path
    agent_id: SpiffeID
    status: str | None
    stdout_path: Path
    stderr_path: Path
    _stdout: IO[bytes] = field(repr=False)
    _stderr: IO[bytes] = field(repr=False)

    @property
    def endpoint(self) -> str:
        """The Workload API address, as ``SPIFFE_ENDPOINT_SOCKET`` takes it."""
        return f"unix://{self.socket}"

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        return endpoint_env(self.endpoint, base)

    def api(self, *argv: str, check: bool = True) -> CLIResult:
        """``spiffe-agent api <argv> --socket <this agent>``."""
        result = run_agent_cli("api", *argv, "--socket", self.endpoint)
        if check:
            assert result.returncode == 0, result.describe()
        return result

    async def aapi(self, *argv: str, check: bool = True) -> CLIResult:
        result = await run_agent_cli_async("api", *argv, "--socket", self.endpoint)
        if check:
            assert result.returncode == 0, result.describe()
        return result

    def status_url(self, path: str) -> str:
        assert self.status is not None, "the agent was started without --status"
        return f"http://{self.status}{path}"

    def rss_bytes(self) -> int:
        """The agent process's resident set size, from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line in /proc/<pid>/status")

    def stop(self, *, timeout: float = STOP_TIMEOUT, prompt: float = PROMPT_EXIT) -> float:
        """SIGTERM; the agent must exit with 0 within ``prompt`` seconds. Returns how long it took."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"spiffe-agent did not exit within {timeout}s of SIGTERM\n{self.stderr}") from None
        finally:
            self._close_files()
        elapsed = time.monotonic() - started
        assert code == 0, f"spiffe-agent exited {code} after SIGTERM\n{self.stderr}"
        assert elapsed < prompt, f"spiffe-agent took {elapsed:.2f}s to exit after SIGTERM\n{self.stderr}"
        assert not self.socket.exists(), f"spiffe-agent left its socket {self.socket} behind"
        return elapsed

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._close_files()

    def _close_files(self) -> None:
        self._stdout.close()
        self._stderr.close()


def agent_argv(
    data_dir: Path,
    *,
    server: str | None = None,
    trust_domain: str | None = "example.org",
    join_token: str | None = None,
    trust_bundle: Path | None = None,
    insecure_bootstrap: bool = False,
    socket_path: Path | None = None,
    status: str | None = None,
    config: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of ``spiffe-agent run`` with these options."""
    argv = [agent_script(), "run", "--data-dir", str(data_dir)]
    for flag, value in (
        ("--config", config),
        ("--server", server),
        ("--trust-domain", trust_domain),
        ("--join-token", join_token),
        ("--trust-bundle", trust_bundle),
        ("--socket", socket_path),
        ("--status", status),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if insecure_bootstrap:
        argv.append("--insecure-bootstrap")
    return [*argv, *extra]


def start_agent(
    data_dir: Path,
    server: str,
    *,
    socket_path: Path,
    join_token: str | None = None,
    trust_bundle: Path | None = None,
    insecure_bootstrap: bool = False,
    status: str | None = None,
    trust_domain: str = "example.org",
    extra: Sequence[str] = (),
    timeout: float = READY_TIMEOUT,
) -> AgentProcess:
    """Start ``spiffe-agent run`` with its identity in ``data_dir``; return once it says it is ready."""
    logs = data_dir.parent / f"{data_dir.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    argv = agent_argv(
        data_dir,
        server=server,
        trust_domain=trust_domain,
        join_token=join_token,
        trust_bundle=trust_bundle,
        insecure_bootstrap=insecure_bootstrap,
        socket_path=socket_path,
        status=status,
        extra=extra,
    )
    started = start_until_ready(argv, logs=logs, name="spiffe-agent", ready=READY_RE, timeout=timeout)
    match = started.ready
    assert Path(match["socket"]) == socket_path, match.string
    return AgentProcess(
        process=started.process,
        data_dir=data_dir,
        socket=socket_path,
        agent_id=SpiffeID.parse(match["id"]),
        status=status,
        stdout_path=started.stdout_path,
        stderr_path=started.stderr_path,
        _stdout=started.stdout,
        _stderr=started.stderr,
    )


@contextmanager
def running_agent(data_dir: Path, server: str, **options: Any) -> Iterator[AgentProcess]:
    """An agent for the ``with`` block; stopped with SIGTERM (and checked) at its end."""
    agent = start_agent(data_dir, server, **options)
    try:
        yield agent
    finally:
        if agent.process.poll() is None:
            agent.stop()
        else:
            agent._close_files()


def run_agent_to_exit(argv: Sequence[str], *, timeout: float = READY_TIMEOUT) -> CLIResult:
    """Run ``spiffe-agent run`` that is expected to fail at start-up; killed (and reported) if it runs on."""
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)  # noqa: S603
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{' '.join(argv)} did not exit within {timeout}s: {err.stderr!r}") from None
    return CLIResult(tuple(argv), done.returncode, done.stdout, done.stderr, time.monotonic() - started)


# --- workloads -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunAs:
    """The ids a workload program drops to before it connects."""

    uid: int
    gid: int

    def env(self) -> dict[str, str]:
        return {"TEST_DROP_IDS": f"{self.uid}:{self.gid}"}


async def start_workload(
    program: str, *args: str, endpoint: str, run_as: RunAs | None = None
) -> asyncio.subprocess.Process:
    """Start a Python workload program (this venv's interpreter) that reports JSON lines on stdout.

    The program is given :data:`DROP_IDS` first; it should call ``drop_ids()`` once its imports are
    done. ``SPIFFE_ENDPOINT_SOCKET`` is ``endpoint``.
    """
    env = endpoint_env(endpoint)
    env.pop("TEST_DROP_IDS", None)
    if run_as is not None:
        env.update(run_as.env())
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DROP_IDS + program,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_event(process: asyncio.subprocess.Process, timeout: float = WORKLOAD_TIMEOUT) -> dict[str, Any]:
    """The next JSON line the workload printed; its stderr in the failure if it ended first."""
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout)
    except TimeoutError:
        raise AssertionError(f"the workload printed nothing for {timeout}s") from None
    if not line:
        await process.wait()
        stderr = (await process.stderr.read()).decode(errors="replace")
        raise AssertionError(f"the workload ended (exit code {process.returncode}) early:\n{stderr}")
    event: dict[str, Any] = json.loads(line)
    return event


async def finish_workload(process: asyncio.subprocess.Process, timeout: float = WORKLOAD_TIMEOUT) -> None:
    """Wait for the workload to exit 0 (killed and reported otherwise)."""
    assert process.stderr is not None
    try:
        code = await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"the workload did not exit within {timeout}s") from None
    stderr = (await process.stderr.read()).decode(errors="replace")
    assert code == 0, f"the workload exited {code}:\n{stderr}"


async def stop_workload(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()


async def run_workload(
    program: str, *args: str, endpoint: str, run_as: RunAs | None = None, timeout: float = WORKLOAD_TIMEOUT
) -> list[dict[str, Any]]:
    """Run a workload program to completion; every JSON line it printed."""
    process = await start_workload(program, *args, endpoint=endpoint, run_as=run_as)
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    finally:
        await stop_workload(process)
    assert process.returncode == 0, f"the workload exited {process.returncode}:\n{stderr.decode(errors='replace')}"
    return [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]


def remove_socket_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
