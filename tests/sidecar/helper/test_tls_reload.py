"""End to end: spiffe-server, spiffe-agent and ``spiffe-agent helper`` as real processes, and a real
TLS server that reloads its certificate on the helper's SIGHUP and then presents the rotated one."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.support.server import ServerProcess, running_server, script

PROGRAMS = str(Path(__file__).with_name("programs.py"))
TIMEOUT = 60.0


def _wait(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path / "server") as process:
        yield process


@pytest.fixture
def agent_socket(server: ServerProcess, tmp_path: Path) -> Iterator[Path]:
    """A real spiffe-agent, attested with a join token, serving an entry for this process's uid
    whose X.509-SVIDs live 10 s (so they rotate every few seconds)."""
    token = server.token("--spiffe-id", "spiffe://example.org/node1")
    server.cli(
        "entry", "create", "--spiffe-id", "spiffe://example.org/web", "--parent-id", "spiffe://example.org/node1",
        "--selector", f"unix:uid:{os.getuid()}", "--x509-ttl", "10",
    )  # fmt: skip
    roots = tmp_path / "roots.pem"
    roots.write_bytes(server.roots_pem())
    directory = Path(f"/tmp/spiffe-helper-test-{os.getpid()}-{time.monotonic_ns()}")  # noqa: S108 - short socket path
    directory.mkdir()
    api_socket = directory / "api.sock"
    out = (tmp_path / "agent.out").open("wb")
    err = (tmp_path / "agent.err").open("wb")
    agent = subprocess.Popen(  # noqa: S603 - our own console script
        [
            script("spiffe-agent"), "run", "--trust-domain", "example.org", "--server", server.address,
            "--trust-bundle", str(roots), "--join-token", token, "--data-dir", str(tmp_path / "agent"),
            "--socket", str(api_socket),
        ],
        stdout=out,
        stderr=err,
    )  # fmt: skip
    try:
        _wait(
            lambda: b"spiffe-agent ready" in (tmp_path / "agent.out").read_bytes() or agent.poll() is not None, "agent"
        )
        assert agent.poll() is None, (tmp_path / "agent.err").read_text()
        yield api_socket
    finally:
        _stop(agent)  # before the server: the agent is stopped while the server still answers
        out.close()
        err.close()
        shutil.rmtree(directory, ignore_errors=True)


def _served_certificate(port: int, bundle: Path) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # SPIFFE IDs are URI SANs: trust comes from the bundle
    context.load_verify_locations(bundle)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
        tls.sendall(b"x")
    assert der is not None
    return der


def _leaf(cert_dir: Path) -> bytes:
    return x509.load_pem_x509_certificates((cert_dir / "svid.pem").read_bytes())[0].public_bytes(Encoding.DER)


def test_a_tls_server_reloads_on_the_signal_and_presents_the_rotated_certificate(
    agent_socket: Path, tmp_path: Path
) -> None:
    cert_dir, pid_file, log = tmp_path / "certs", tmp_path / "tls.pid", tmp_path / "tls.log"
    cert_dir.mkdir()
    helper_err = tmp_path / "helper.err"
    with helper_err.open("wb") as err:
        helper = subprocess.Popen(  # noqa: S603 - our own console script
            [
                script("spiffe-agent"), "helper", "--socket", str(agent_socket), "--cert-dir", str(cert_dir),
                "--pid-file", str(pid_file), "--signal", "SIGHUP",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )  # fmt: skip
    tls = None
    try:
        _wait((cert_dir / "svid_key.pem").exists, "the first files")
        tls = subprocess.Popen([sys.executable, PROGRAMS, "tls-server", str(cert_dir), str(pid_file), str(log)])  # noqa: S603
        _wait(lambda: log.exists() and log.read_text().startswith("port "), "the TLS server")
        port = int(log.read_text().split()[1])
        first = _served_certificate(port, cert_dir / "bundle.pem")

        def rotated_and_served() -> bool:
            expected = _leaf(cert_dir)
            return expected != first and _served_certificate(port, cert_dir / "bundle.pem") == expected

        _wait(rotated_and_served, "the TLS server to present the rotated certificate")
        lines = log.read_text().splitlines()
        assert any(line.startswith("reloaded ") for line in lines), lines
        assert not [line for line in lines if line.startswith("reload failed")], lines
        assert helper.poll() is None, helper_err.read_text()
    finally:
        if tls is not None:
            _stop(tls)
        _stop(helper)
    assert helper.returncode == 0, helper_err.read_text()
    text = helper_err.read_text()
    assert "signalled the pid file's process" in text
    assert "PRIVATE KEY" not in text
