"""``make demo`` end to end: ``python -m demo`` as a subprocess, with every real process it starts.

One run goes through the eight steps and stops by itself (``--duration``); two more are
interrupted with SIGINT, once while the sidecars are starting and once after the steps, as a
Ctrl-C would. Each must stop everything it started: no process carrying the run's marker
(``SPIFFE_DEMO_RUN=<work directory>`` in its environment) may outlive it, and the work directory
is gone.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from demo.processes import RUN_MARKER

ROOT: Final = Path(__file__).resolve().parents[2]
WORKDIR_RE: Final = re.compile(r"working in (?P<path>/\S+)")
RUN_TIMEOUT: Final = 60.0


def demo_argv(*options: str) -> list[str]:
    return [sys.executable, "-m", "demo", "--pause", "0", *options]


def workdir_of(output: str) -> Path:
    match = WORKDIR_RE.search(output)
    assert match is not None, output
    return Path(match["path"])


def processes_of(workdir: Path) -> list[str]:
    """Every live process whose environment carries this run's marker: its pid and command line."""
    marker = f"{RUN_MARKER}={workdir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdecimal():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name}: {command}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def assert_cleaned_up(output: str) -> None:
    workdir = workdir_of(output)
    assert processes_of(workdir) == []
    assert not workdir.exists()
    assert "Everything stopped cleanly." in output


@pytest.mark.timeout(RUN_TIMEOUT + 10)
def test_demo_runs_every_step_and_stops_by_itself() -> None:
    done = subprocess.run(  # noqa: S603 - our own program
        demo_argv("--duration", "5"), cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for line in (
        "OK  control plane up",
        "OK  agent attested (pid ",
        "OK  4 entries registered",
        "OK  frontend sidecar (pid ",
        "OK  backend sidecar (pid ",
        "OK  frontend -> backend over mTLS succeeded: the backend saw the caller spiffe://demo.example/frontend",
        "OK  intruder spiffe://demo.example/intruder rejected by the backend's sidecar during the TLS handshake: "
        "its SPIFFE ID is not one the sidecar allows",
        "OK  frontend -> legacy service through spiffe-proxy succeeded: "
        "the proxy let in spiffe://demo.example/frontend",
        "OK  intruder spiffe://demo.example/intruder rejected by spiffe-proxy during the TLS handshake: "
        "its SPIFFE ID is not one the proxy allows",
        "Stopping after 5 s (--duration).",
    ):
        assert line in done.stdout, output
    assert "received its certificate over SDS: spiffe://demo.example/frontend, serial " in done.stdout
    assert "received its certificate over SDS: spiffe://demo.example/backend, serial " in done.stdout
    assert "URI=spiffe://demo.example/frontend" in done.stdout  # the x-forwarded-client-cert header
    # The legacy step: spiffe-proxy took its identity from the agent's Workload API, the legacy
    # service answered the frontend through it, and the proxy logged both decisions.
    assert re.search(
        r"spiffe-proxy ready: server mode, listening on 127\.0\.0\.1:\d+, upstream 127\.0\.0\.1:\d+, "
        r"identity spiffe://demo\.example/legacy\n",
        done.stdout,
    ), output
    assert "legacy service answered: 'hello from the legacy service (plain HTTP, no TLS)'" in done.stdout
    assert "spiffe-proxy logged: connection accepted, spiffe_id spiffe://demo.example/frontend" in done.stdout
    assert (
        'spiffe-proxy logged: connection rejected, authorize: "spiffe://demo.example/intruder" is not allowed: '
        'want one of IDs ["spiffe://demo.example/frontend"]'
    ) in done.stdout
    assert "stopped spiffe-proxy (the legacy service's)" in done.stdout
    rotation = re.search(r"OK  rotation seen live in \d+ ms: .* (?P<n>\d+) requests meanwhile, 0 failed", done.stdout)
    assert rotation is not None, output
    assert int(rotation["n"]) > 0
    assert done.stderr == ""
    assert_cleaned_up(output)


@pytest.mark.timeout(RUN_TIMEOUT + 10)
@pytest.mark.parametrize(
    ("interrupt_after", "code", "said"),
    [
        pytest.param("[4/8] ", 130, "Interrupted (SIGINT) during step 4; stopping.", id="while-sidecars-start"),
        pytest.param("All steps done.", 0, "Stopping (SIGINT).", id="after-the-steps"),
    ],
)
def test_sigint_stops_everything_cleanly(interrupt_after: str, code: int, said: str) -> None:
    process = subprocess.Popen(  # noqa: S603 - our own program
        demo_argv(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith(interrupt_after):
                process.send_signal(signal.SIGINT)
                break
        rest, _ = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(lines) + rest
    assert process.returncode == code, output
    assert said in output
    assert "stopped the control plane (spiffe-server)" in output
    assert_cleaned_up(output)
