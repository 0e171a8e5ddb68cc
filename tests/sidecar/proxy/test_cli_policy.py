"""``spiffe-proxy --policy FILE`` as a real process: the file's rules decide who gets through, a
rewrite (by rename, or in place) changes them for new connections while an open one keeps
working, a broken rewrite leaves the policy in force, SIGHUP reads the file even when nothing
about it looks changed, client mode checks the server's ID by the file, and a bad file or a file
with ``--allow-*`` flags exits 2."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest

from sidecar.proxy.address import Address
from sidecar.proxy.policy import POLICY_AND_FLAGS
from tests.sidecar.proxy.support import echo_once
from tests.sidecar.proxy.test_cli import (
    PROXY_ID,
    READY,
    Proxy,
    Setup,
    Upstream,
    _run,
    _script,
    http_get,
    setup,
    upstream,
)
from tests.sidecar.proxy.test_cli_limits import exchange, open_tls
from tests.support.process import start_until_ready

__all__ = ["setup", "upstream"]  # the fixtures, re-exported for pytest

ALICE = "/alice"
BOB = "/bobby"  # as long as ALICE: a rewrite can keep the size


def policy_text(setup: Setup, *paths: str, listen: str = "127.0.0.1:0") -> str:
    ids = ", ".join(setup.ca.trust_domain.id_string() + path for path in paths)
    return f"version: 1\nlisteners:\n  - listen: {listen}\n    allow:\n      ids: [{ids}]\n"


def write_by_rename(path: Path, text: str) -> None:
    """As deployment tools do: write aside, rename over (a new inode)."""
    aside = path.with_name(path.name + ".new")
    aside.write_text(text)
    aside.replace(path)


def write_in_place(path: Path, text: str) -> None:
    """As an editor saving over the file does: the same inode, truncated and written."""
    with path.open("r+") as file:
        file.truncate(0)
        file.write(text)


def allowed(proxy: Proxy, setup: Setup, path: str) -> bool:
    payload = f"hello from {path}".encode()
    try:
        return echo_once(proxy.listen, setup.client(path), payload, timeout=5) == payload
    except (ssl.SSLError, OSError):
        return False


def wait_until(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def metric(proxy: Proxy, sample: str) -> float | None:
    assert proxy.status is not None
    code, text = http_get(f"http://{proxy.status}/metrics")
    assert code == 200
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.parametrize("rewrite", [write_by_rename, write_in_place], ids=["by rename", "in place"])
def test_new_connections_follow_a_rewritten_file_and_open_ones_keep_working(
    setup: Setup, upstream: Upstream, rewrite: object
) -> None:
    assert callable(rewrite)
    policy = setup.tmp / "policy.yaml"
    policy.write_text(policy_text(setup, ALICE))
    proxy = setup.start(upstream.address, "--policy", str(policy), "--status", "127.0.0.1:0")
    alice = setup.ca.trust_domain.id_string() + ALICE
    bob = setup.ca.trust_domain.id_string() + BOB
    in_force = proxy.wait_for_log(lambda e: e["msg"] == "policy in force")
    assert in_force["policy"] == f'one of IDs ["{alice}"]'
    assert in_force["policy_file"] == str(policy)
    assert in_force["listen"] == "127.0.0.1:0"

    assert allowed(proxy, setup, ALICE)
    assert not allowed(proxy, setup, BOB)
    rejected = proxy.wait_for_log(lambda e: e["msg"] == "connection rejected")
    assert rejected["spiffe_id"] == bob
    assert "is not allowed" in rejected["reason"]

    with open_tls(proxy, setup.client(ALICE)) as open_before:
        exchange(open_before, b"before the rewrite")
        rewrite(policy, policy_text(setup, BOB))
        reloaded = proxy.wait_for_log(lambda e: e["msg"] == "policy reloaded" and bob in e["policy"])
        assert reloaded["policy"] == f'one of IDs ["{bob}"]'
        wait_until(lambda: allowed(proxy, setup, BOB))
        assert not allowed(proxy, setup, ALICE)
        exchange(open_before, b"after the rewrite, on the connection made before it")
    assert (metric(proxy, 'spiffe_proxy_policy_reloads_total{result="ok"}') or 0) >= 1
    assert proxy.stop() == 0


def test_a_broken_rewrite_keeps_the_policy_in_force(setup: Setup, upstream: Upstream) -> None:
    policy = setup.tmp / "policy.yaml"
    policy.write_text(policy_text(setup, ALICE))
    proxy = setup.start(upstream.address, "--policy", str(policy), "--status", "127.0.0.1:0")
    assert allowed(proxy, setup, ALICE)
    write_by_rename(policy, policy_text(setup, BOB).replace("ids: [", "ids: [http://nope, "))
    failed = proxy.wait_for_log(lambda e: e["msg"] == "reloading the policy file failed; keeping the policy in force")
    assert failed["level"] == "error"
    assert failed["reason"] == (
        f'policy: {policy}:5: listeners[0].allow: ids[0]: spiffeid: scheme is missing or invalid: "http://nope"'
    )
    assert failed["policy"] == f'one of IDs ["{setup.ca.trust_domain.id_string() + ALICE}"]'
    assert metric(proxy, 'spiffe_proxy_policy_reloads_total{result="error"}') == 1
    assert allowed(proxy, setup, ALICE)
    assert not allowed(proxy, setup, BOB)
    assert not [e for e in proxy.logs() if e["msg"] == "policy reloaded"]
    # Fixed, it is read again.
    write_by_rename(policy, policy_text(setup, BOB))
    proxy.wait_for_log(lambda e: e["msg"] == "policy reloaded")
    wait_until(lambda: allowed(proxy, setup, BOB))
    assert proxy.stop() == 0


def test_sighup_reads_the_file_even_when_it_looks_unchanged(setup: Setup, upstream: Upstream) -> None:
    policy = setup.tmp / "policy.yaml"
    policy.write_text(policy_text(setup, ALICE))
    before = policy.stat()
    proxy = setup.start(upstream.address, "--policy", str(policy))
    # Same inode, same size, same times: the poll cannot tell. SIGHUP reads it all the same.
    write_in_place(policy, policy_text(setup, BOB))
    os.utime(policy, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = policy.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    time.sleep(1.5)  # more than a poll
    assert allowed(proxy, setup, ALICE)
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for_log(lambda e: e["msg"] == "SIGHUP: reloading the policy file")
    proxy.wait_for_log(lambda e: e["msg"] == "policy reloaded")
    wait_until(lambda: allowed(proxy, setup, BOB))
    assert not allowed(proxy, setup, ALICE)
    assert proxy.stop() == 0


def test_client_mode_checks_the_server_id_by_the_file(setup: Setup, upstream: Upstream) -> None:
    server = setup.start(upstream.address, "--allow-id", setup.ca.trust_domain.id_string() + PROXY_ID)
    policy = setup.tmp / "client-policy.yaml"
    policy.write_text(policy_text(setup, PROXY_ID))
    cert, key, bundle = setup.files
    argv = [_script(), "--mode", "client", "--listen", "127.0.0.1:0", "--upstream", str(server.listen)]
    argv += ["--cert", str(cert), "--key", str(key), "--bundle", str(bundle), "--policy", str(policy)]
    started = start_until_ready(argv, logs=setup.tmp, name="spiffe-proxy", ready=READY, timeout=30)
    client = Proxy(started, Address.parse(started.ready["listen"]), None)
    setup.proxies.append(client)

    def plain_exchange() -> bool:
        try:
            with socket.create_connection((client.listen.host, client.listen.port), timeout=5) as plain:
                plain.sendall(b"ping")
                return plain.recv(4) == b"ping"
        except OSError:
            return False

    assert plain_exchange()
    write_by_rename(policy, policy_text(setup, "/someone-else"))
    client.wait_for_log(lambda e: e["msg"] == "policy reloaded")
    wait_until(lambda: not plain_exchange())
    rejected = client.wait_for_log(lambda e: e["msg"] == "upstream rejected")
    assert rejected["spiffe_id"] == setup.ca.trust_domain.id_string() + PROXY_ID
    assert "is not allowed" in rejected["reason"]
    assert client.stop() == 0
    assert server.stop() == 0


def test_policy_with_allow_flags_exits_2(setup: Setup) -> None:
    policy = setup.tmp / "policy.yaml"
    policy.write_text(policy_text(setup, ALICE))
    cert, key, bundle = setup.files
    result = _run(
        "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--cert", str(cert), "--key", str(key),
        "--bundle", str(bundle), "--policy", str(policy), "--allow-id", "spiffe://example.org/x",
    )  # fmt: skip
    assert result.returncode == 2
    assert f"spiffe-proxy: error: proxy: {POLICY_AND_FLAGS}" in result.stderr


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "version: 1\nlisteners:\n  - listen: 127.0.0.1:0\n    allow: {ids: [spiffe://Example.org/x]}\n",
            "spiffe-proxy: error: policy: {path}:4: listeners[0].allow: ids[0]: spiffeid: trust domain characters "
            'are limited to lowercase letters, numbers, dots, dashes, and underscores: "spiffe://Example.org/x"',
        ),
        (
            "version: 1\nlisteners:\n  - listen: 127.0.0.1:9\n    allow: {any_id: true}\n",
            "spiffe-proxy: error: policy: {path}: no rule for this proxy's listener (the file names 127.0.0.1:9; "
            'add an entry for it, or a default): "127.0.0.1:0"',
        ),
        ("", 'spiffe-proxy: error: policy: {path}: missing required key "version"'),
    ],
    ids=["bad ID", "listener not named", "empty"],
)
def test_a_bad_policy_file_at_start_exits_2(setup: Setup, text: str, says: str) -> None:
    policy = setup.tmp / "policy.yaml"
    policy.write_text(text)
    cert, key, bundle = setup.files
    result = _run(
        "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--cert", str(cert), "--key", str(key),
        "--bundle", str(bundle), "--policy", str(policy),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert says.format(path=policy) in result.stderr
