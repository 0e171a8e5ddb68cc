"""``spiffe-proxy --workers N`` as a real process tree: one parent and N worker processes that
accept on the same port (each connection's log line names the worker's pid, and both pids
serve), ``/metrics`` summed over the workers, SIGTERM drains an open connection and every
process exits, a killed worker is reported and started again, and a unix listener is refused."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.sidecar.proxy.test_cli import (
    CLIENT_ID,
    Proxy,
    Setup,
    Upstream,
    _run,
    allow_client,
    http_get,
    setup,
    upstream,
)
from tests.sidecar.proxy.test_cli_limits import exchange, open_tls
from tests.sidecar.proxy.test_cli_policy import ALICE, BOB, policy_text, write_by_rename

__all__ = ["setup", "upstream"]  # the fixtures, re-exported for pytest

CONNECTIONS = 24
"""Enough that the kernel's hash of the client ports puts some on each of two workers: all on one
would happen with probability 2 / 2**24."""


def parent_of(pid: int) -> int:
    """The parent pid of ``pid``, from ``/proc/<pid>/stat`` (after the command name in parentheses)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def worker_pids(proxy: Proxy) -> list[int]:
    ready = proxy.wait_for_log(lambda e: e["msg"] == "workers ready")
    pids = ready["pids"]
    assert isinstance(pids, list)
    return [int(pid) for pid in pids]


def samples(proxy: Proxy) -> dict[str, float]:
    assert proxy.status is not None
    code, text = http_get(f"http://{proxy.status}/metrics")
    assert code == 200
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def wait_for(predicate: object, timeout: float = 15.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_workers_serve_one_port_count_together_and_drain_on_sigterm(setup: Setup, upstream: Upstream) -> None:
    proxy = setup.start(upstream.address, *allow_client(setup), "--workers", "2", "--status", "127.0.0.1:0")
    assert proxy.started.ready["workers"] == "2"
    parent = proxy.process.pid
    pids = worker_pids(proxy)
    assert len(set(pids)) == 2
    assert all(parent_of(pid) == parent for pid in pids)

    context = setup.client()
    for index in range(CONNECTIONS):
        with open_tls(proxy, context) as tls:
            exchange(tls, b"connection %d" % index)
    wait_for(lambda: len([e for e in proxy.logs() if e["msg"] == "connection accepted"]) == CONNECTIONS)
    accepted = [e for e in proxy.logs() if e["msg"] == "connection accepted"]
    assert {e["pid"] for e in accepted} == set(pids)  # both workers accepted connections
    assert {e["spiffe_id"] for e in accepted} == {setup.ca.trust_domain.id_string() + CLIENT_ID}

    assert proxy.status is not None
    assert http_get(f"http://{proxy.status}/readyz") == (200, "ready\n")
    payload = sum(len(b"connection %d" % index) for index in range(CONNECTIONS))
    wait_for(lambda: samples(proxy).get('spiffe_proxy_bytes_total{direction="to_upstream"}') == payload)
    metrics = samples(proxy)
    assert metrics["spiffe_proxy_connections_accepted_total"] == CONNECTIONS
    assert metrics['spiffe_proxy_handshakes_total{reason="",result="ok"}'] == CONNECTIONS
    assert metrics['spiffe_proxy_bytes_total{direction="to_downstream"}'] == payload
    assert metrics["spiffe_proxy_workers_ready"] == 2
    assert metrics["spiffe_proxy_worker_restarts_total"] == 0

    with open_tls(proxy, context) as open_during_stop:
        exchange(open_during_stop, b"before SIGTERM")
        wait_for(lambda: samples(proxy)["spiffe_proxy_connections_active"] == 1)
        proxy.process.send_signal(signal.SIGTERM)
        proxy.wait_for_log(lambda e: e["msg"] == "shutting down: the workers drain their connections")
        wait_for(
            lambda: len([e for e in proxy.logs() if e["msg"] == "shutting down: draining connections"]) == 2,
        )
        with pytest.raises(ConnectionRefusedError):  # no worker accepts any more
            socket.create_connection((proxy.listen.host, proxy.listen.port), timeout=2).close()
        exchange(open_during_stop, b"during the drain")
        assert proxy.process.poll() is None
    assert proxy.stop(None) == 0
    assert not any(alive(pid) for pid in pids)


def test_a_killed_worker_is_reported_and_started_again(setup: Setup, upstream: Upstream) -> None:
    proxy = setup.start(upstream.address, *allow_client(setup), "--workers", "2", "--status", "127.0.0.1:0")
    assert proxy.status is not None
    first, second = worker_pids(proxy)
    os.kill(first, signal.SIGKILL)
    died = proxy.wait_for_log(lambda e: e["msg"] == "a worker died; starting it again")
    assert died["level"] == "error"
    assert died["pid"] == first
    assert died["signal"] == "SIGKILL"
    assert died["worker"] == 0
    restarted = proxy.wait_for_log(lambda e: e["msg"] == "worker restarted", timeout=30)
    replacement = restarted["pid"]
    assert replacement not in (first, second)
    assert parent_of(replacement) == proxy.process.pid
    wait_for(lambda: http_get(f"http://{proxy.status}/readyz") == (200, "ready\n"))
    assert samples(proxy)["spiffe_proxy_worker_restarts_total"] == 1
    for _ in range(4):
        with open_tls(proxy, setup.client()) as tls:
            exchange(tls, b"still served")
    assert proxy.stop() == 0
    assert not alive(second)
    assert not alive(replacement)


def test_workers_do_not_outlive_a_killed_parent(setup: Setup, upstream: Upstream) -> None:
    proxy = setup.start(upstream.address, *allow_client(setup), "--workers", "2")
    pids = worker_pids(proxy)
    assert proxy.stop(signal.SIGKILL) == -signal.SIGKILL
    wait_for(lambda: not any(alive(pid) for pid in pids))  # each got SIGTERM from the kernel, drained, exited
    stopped = [e for e in proxy.logs() if e["msg"] == "stopped" and "pid" in e]
    assert {e["pid"] for e in stopped} == set(pids)


def test_a_port_in_use_fails_before_any_worker_starts(setup: Setup, upstream: Upstream) -> None:
    """The port is taken by a listener without SO_REUSEPORT: the parent's own reservation fails,
    before any worker starts, with exit code 1 (it cannot start; the flags are fine)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cert, key, bundle = setup.files
        result = _run(
            "--listen", f"127.0.0.1:{port}", "--upstream", upstream.address, "--cert", str(cert), "--key", str(key),
            "--bundle", str(bundle), "--allow-any-id", "--workers", "2",
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Address already in use" in result.stderr
    assert not result.stdout


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["--listen", "unix:/tmp/spiffe-proxy-workers.sock", "--workers", "2"],
            "spiffe-proxy: error: proxy: --workers above 1 needs a TCP --listen address: processes cannot share "
            'a unix socket with SO_REUSEPORT: "unix:/tmp/spiffe-proxy-workers.sock"',
        ),
        (["--listen", "127.0.0.1:0", "--workers", "0"], "argument --workers: must be 1 or more: '0'"),
        (["--listen", "127.0.0.1:0", "--workers", "two"], "argument --workers: not a whole number: 'two'"),
    ],
    ids=["unix listener", "zero", "not a number"],
)
def test_bad_workers_configuration_exits_2(setup: Setup, argv: list[str], says: str) -> None:
    cert, key, bundle = setup.files
    result = _run(
        "--upstream", "127.0.0.1:1", "--cert", str(cert), "--key", str(key), "--bundle", str(bundle),
        "--allow-any-id", *argv,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert not result.stdout


def test_a_bad_identity_file_exits_2_before_any_worker(setup: Setup) -> None:
    cert, key, bundle = setup.files
    key.write_text("not a key")
    result = _run(
        "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--cert", str(cert), "--key", str(key),
        "--bundle", str(bundle), "--allow-any-id", "--workers", "2",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "could not load the SVID" in result.stderr
    assert '"worker"' not in result.stderr  # no worker ever logged


def test_every_worker_follows_the_policy_file_and_hears_sighup(setup: Setup, upstream: Upstream) -> None:
    policy = setup.tmp / "policy.yaml"
    policy.write_text(policy_text(setup, ALICE))
    proxy = setup.start(upstream.address, "--policy", str(policy), "--workers", "2")
    pids = set(worker_pids(proxy))
    in_force = [e for e in proxy.logs() if e["msg"] == "policy in force"]
    assert {e["pid"] for e in in_force} == pids
    write_by_rename(policy, policy_text(setup, BOB))
    wait_for(lambda: {e["pid"] for e in proxy.logs() if e["msg"] == "policy reloaded"} == pids)
    for _ in range(6):  # whichever worker takes it
        with open_tls(proxy, setup.client(BOB)) as tls:
            exchange(tls, b"bob now")
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for_log(lambda e: e["msg"] == "SIGHUP: forwarded to the workers")
    wait_for(lambda: {e.get("pid") for e in proxy.logs() if e["msg"] == "SIGHUP: reloading the policy file"} == pids)
    assert proxy.stop() == 0
