"""``spiffe-proxy`` as a real process at its limits: ``--max-conns``, ``--handshake-timeout`` (a client
that never sends a ClientHello), ``--idle-timeout``, and the rejection reasons of a peer with an
expired certificate, a certificate of another trust domain, and no certificate at all."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest

from sidecar.proxy.metrics import Reason
from sidecar.proxy.server import handshake_reason
from tests.sidecar.proxy.support import tls_client
from tests.sidecar.proxy.test_cli import Proxy, Setup, Upstream, allow_client, refused_exchange, setup, upstream
from tests.support.ca import TestCA

__all__ = ["setup", "upstream"]  # the fixtures, re-exported for pytest


@contextlib.contextmanager
def open_tls(proxy: Proxy, context: ssl.SSLContext) -> Iterator[ssl.SSLSocket]:
    with (
        socket.create_connection((proxy.listen.host, proxy.listen.port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        yield tls


def exchange(tls: ssl.SSLSocket, payload: bytes) -> None:
    tls.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = tls.recv(65536)
        assert chunk, "the proxy closed the connection"
        received += chunk
    assert received == payload


def closed_within(sock: socket.socket | ssl.SSLSocket, timeout: float) -> float:
    """Seconds until the proxy closes ``sock`` (EOF or reset); fails after ``timeout``."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionError, ssl.SSLError):
        pass
    except TimeoutError:
        pytest.fail(f"still open after {timeout} s")
    return time.monotonic() - start


def _new_rejection(seen: set[str], entry: dict[str, Any]) -> bool:
    return bool(entry["msg"] == "connection rejected" and entry["reason"] not in seen)


def test_max_conns_refuses_the_extra_connection_while_the_first_ones_work(setup: Setup, upstream: Upstream) -> None:
    proxy = setup.start(upstream.address, *allow_client(setup), "--max-conns", "2")
    context = setup.client()
    with open_tls(proxy, context) as first, open_tls(proxy, context) as second:
        exchange(first, b"one")
        exchange(second, b"two")
        with pytest.raises((ssl.SSLError, OSError)):
            refused_exchange(proxy.listen, context)
        refused = proxy.wait_for_log(lambda e: e["msg"] == "connection refused: too many connections")
        assert refused["max_connections"] == 2
        exchange(first, b"still one")
        exchange(second, b"still two")
    # Once they are gone there is room again.
    deadline = time.monotonic() + 10
    while True:
        try:
            with open_tls(proxy, context) as again:
                exchange(again, b"room again")
            break
        except (ssl.SSLError, OSError):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert proxy.stop() == 0


def test_handshake_timeout_closes_a_client_that_never_says_hello(setup: Setup, upstream: Upstream) -> None:
    proxy = setup.start(upstream.address, *allow_client(setup), "--handshake-timeout", "1")
    with socket.create_connection((proxy.listen.host, proxy.listen.port), timeout=10) as silent:
        took = closed_within(silent, 1 + 1)
    assert took >= 0.8
    rejected = proxy.wait_for_log(lambda e: e["msg"] == "connection rejected")
    assert rejected["reason"] == "handshake timed out after 1 s"
    # Other clients were not harmed.
    with open_tls(proxy, setup.client()) as tls:
        exchange(tls, b"fine")
    assert proxy.stop() == 0


def test_idle_timeout_closes_an_idle_relayed_connection(setup: Setup, upstream: Upstream) -> None:
    proxy = setup.start(upstream.address, *allow_client(setup), "--idle-timeout", "1")
    with open_tls(proxy, setup.client()) as tls:
        exchange(tls, b"then silence")
        took = closed_within(tls, 1 + 2)
    assert took >= 0.5
    aborted = proxy.wait_for_log(lambda e: e["msg"] == "connection aborted")
    assert aborted["reason"] == "idle for 1 s"
    assert proxy.stop() == 0


def test_expired_foreign_and_missing_client_certificates_are_refused_with_distinct_reasons(
    setup: Setup, upstream: Upstream
) -> None:
    proxy = setup.start(upstream.address, "--allow-any-id")
    now = datetime.now(UTC)
    expired = setup.ca.mint("/client", not_before=now - timedelta(hours=2), not_after=now - timedelta(hours=1))
    other = TestCA.create("other.example")
    clients = {
        "expired": tls_client(expired.svid(), setup.ca),
        "foreign": tls_client(other.mint("/client").svid(), setup.ca, other),
        "none": tls_client(None, setup.ca),
    }
    reasons: dict[str, str] = {}
    for name, context in clients.items():
        with pytest.raises((ssl.SSLError, OSError)):
            refused_exchange(proxy.listen, context)
        entry = proxy.wait_for_log(partial(_new_rejection, set(reasons.values())))
        assert entry["level"] == "warning"
        assert entry["peer_address"].startswith("127.0.0.1:")
        reasons[name] = entry["reason"]
    assert len(set(reasons.values())) == 3, reasons
    assert reasons["expired"] == "x509: certificate has expired"
    assert reasons["foreign"].startswith("x509: "), reasons  # no chain to a root of the bundle
    assert "did not return a certificate" in reasons["none"], reasons
    # The metrics label of each (OpenSSL itself reports the missing certificate, before the verify
    # callback runs; that reason is recognised too).
    assert handshake_reason(reasons["expired"]) == Reason.EXPIRED
    assert handshake_reason(reasons["foreign"]) == Reason.UNTRUSTED
    assert handshake_reason(reasons["none"]) == Reason.NO_CLIENT_CERT
    assert len([e for e in proxy.logs() if e["msg"] == "connection rejected"]) == 3
    assert not [e for e in proxy.logs() if e["msg"] == "connection accepted"]
    assert upstream.server.socket.fileno() >= 0
    assert proxy.stop() == 0
