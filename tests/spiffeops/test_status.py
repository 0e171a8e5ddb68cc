"""The status server, over real HTTP on loopback."""

from __future__ import annotations

import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter

from spiffeops.status import AddressError, StatusServer, parse_host_port

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy


class Ready:
    """A readiness flag flipped by the test, as a main flips it after startup."""

    def __init__(self) -> None:
        self.ready = False
        self.lock = threading.Lock()

    def __call__(self) -> tuple[bool, str]:
        with self.lock:
            return (True, "ready") if self.ready else (False, "waiting for the first SVID")


def _get(server: StatusServer, path: str, *, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    host, port = server.address
    host = f"[{host}]" if ":" in host else host
    request = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
    try:
        with _OPENER.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


@pytest.fixture
def ready() -> Ready:
    return Ready()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def server(ready: Ready, registry: CollectorRegistry) -> Iterator[StatusServer]:
    with StatusServer("127.0.0.1", 0, readiness=ready, registry=registry) as running:
        yield running


def test_healthz(server: StatusServer) -> None:
    status, headers, body = _get(server, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["Content-Length"] == "3"


def test_readyz_follows_the_readiness_callable(server: StatusServer, ready: Ready) -> None:
    assert _get(server, "/readyz")[::2] == (503, b"waiting for the first SVID\n")
    ready.ready = True
    assert _get(server, "/readyz")[::2] == (200, b"ready\n")
    assert _get(server, "/readyz?verbose=1")[::2] == (200, b"ready\n")


def test_metrics(server: StatusServer, registry: CollectorRegistry) -> None:
    svids = Counter("svids_issued", "X.509-SVIDs issued", registry=registry)
    svids.inc(3)
    status, headers, body = _get(server, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST
    assert b"# TYPE svids_issued_total counter\n" in body
    assert b"svids_issued_total 3.0\n" in body


def test_metrics_default_to_the_global_registry(ready: Ready) -> None:
    with StatusServer(readiness=ready) as server:
        assert server.registry is prometheus_client.REGISTRY
        status, _, body = _get(server, "/metrics")
    assert status == 200
    assert b"python_info" in body


@pytest.mark.parametrize("path", ["/", "/healthz/", "/metrics/x", "/HEALTHZ", "/../etc/passwd"])
def test_unknown_paths_are_404(server: StatusServer, path: str) -> None:
    assert _get(server, path)[::2] == (404, b"not found\n")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
def test_other_methods_are_405(server: StatusServer, method: str) -> None:
    status, headers, body = _get(server, "/healthz", method=method)
    assert (status, body) == (405, b"method not allowed\n")
    assert headers["Allow"] == "GET"


def test_head_is_405_without_a_body(server: StatusServer) -> None:
    status, headers, body = _get(server, "/healthz", method="HEAD")
    assert (status, body) == (405, b"")
    assert headers["Allow"] == "GET"


def test_a_failing_readiness_check_means_not_ready(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("store unreachable")

    with StatusServer(readiness=broken, registry=registry) as server:
        assert _get(server, "/readyz")[::2] == (503, b"readiness check failed: RuntimeError: store unreachable\n")
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == "status: the readiness check failed"
    assert record.exc_info is not None


def test_requests_go_to_logging_not_stderr(
    server: StatusServer, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="spiffeops.status")
    _get(server, "/healthz")
    _get(server, "/nope")
    _get(server, "/healthz", method="POST")
    assert capfd.readouterr().err == ""
    requests = [r for r in caplog.records if r.getMessage() == "status: request"]
    assert [(r.method, r.path, r.status) for r in requests] == [  # type: ignore[attr-defined]
        ("GET", "/healthz", "200"),
        ("GET", "/nope", "404"),
        ("POST", "/healthz", "405"),
    ]
    assert all(r.levelno == logging.DEBUG for r in requests)


def test_a_malformed_request_is_answered_and_logged(
    server: StatusServer, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="spiffeops.status")
    with socket.create_connection(server.address, timeout=10) as conn:
        conn.sendall(b"GET / x HTTP/1.1\r\n\r\n")
        reply = conn.recv(4096)
    assert reply.startswith(b"HTTP/1.0 400 Bad request syntax")
    assert capfd.readouterr().err == ""
    assert any("Bad request" in r.getMessage() for r in caplog.records)


def test_ipv6_loopback(ready: Ready, registry: CollectorRegistry) -> None:
    server = StatusServer("::1", 0, readiness=ready, registry=registry)
    try:
        server.start()
    except OSError as err:  # pragma: no cover - depends on the machine
        pytest.skip(f"no IPv6 loopback: {err}")
    try:
        assert server.address[0] == "::1"
        assert _get(server, "/healthz")[::2] == (200, b"ok\n")
    finally:
        server.stop()


def test_lifecycle(ready: Ready, registry: CollectorRegistry) -> None:
    server = StatusServer("127.0.0.1", 0, readiness=ready, registry=registry)
    with pytest.raises(RuntimeError, match=r"^status: the server is not running$"):
        _ = server.address
    server.stop()  # before start: nothing to do
    server.start()
    host, port = server.address
    assert host == "127.0.0.1"
    assert port > 0
    with pytest.raises(RuntimeError, match=r"^status: a status server can be started only once$"):
        server.start()
    server.stop()
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=10).close()
    with pytest.raises(RuntimeError, match=r"^status: a status server can be started only once$"):
        server.start()


def test_a_port_in_use_is_an_error_at_start(server: StatusServer, ready: Ready) -> None:
    other = StatusServer(*server.address, readiness=ready)
    with pytest.raises(OSError, match="Address already in use"):
        other.start()


def test_the_server_does_not_start_a_thread_before_start(ready: Ready) -> None:
    before = threading.active_count()
    StatusServer("127.0.0.1", 0, readiness=ready)
    assert threading.active_count() == before


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        ("[::1]:9090", ("::1", 9090)),
        (":9090", ("127.0.0.1", 9090)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),  # noqa: S104 (asked for explicitly)
        ("localhost:0", ("localhost", 0)),
        ("status.internal.:65535", ("status.internal.", 65535)),
        ("[fe80::1]:1", ("fe80::1", 1)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


def test_parse_host_port_default_host() -> None:
    assert parse_host_port(":9090", default_host="::1") == ("::1", 9090)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("9090", 'status: invalid address "9090": expected HOST:PORT, [IPV6]:PORT or :PORT'),
        ("", 'status: invalid address "": expected HOST:PORT, [IPV6]:PORT or :PORT'),
        ("::1:9090", 'status: invalid address "::1:9090": an IPv6 address must be in brackets, as in [::1]:9090'),
        (
            "[127.0.0.1]:80",
            'status: invalid address "[127.0.0.1]:80": brackets must hold an IPv6 address, got "127.0.0.1"',
        ),
        ("[::1]", 'status: invalid address "[::1]": an IPv6 address must be in brackets, as in [::1]:9090'),
        ("host:", 'status: invalid address "host:": the port must be a number from 0 to 65535, got ""'),
        ("host:http", 'status: invalid address "host:http": the port must be a number from 0 to 65535, got "http"'),
        ("host:65536", 'status: invalid address "host:65536": the port must be a number from 0 to 65535, got "65536"'),
        ("host:+80", 'status: invalid address "host:+80": the port must be a number from 0 to 65535, got "+80"'),
        ("host: 80", 'status: invalid address "host: 80": the port must be a number from 0 to 65535, got " 80"'),
        ("bad host:80", 'status: invalid address "bad host:80": invalid host "bad host"'),
        ("-x:80", 'status: invalid address "-x:80": invalid host "-x"'),
        ("a\nb:80", 'status: invalid address "a\\nb:80": invalid host "a\\nb"'),
    ],
)
def test_parse_host_port_errors(text: str, message: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_host_port(text)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)
