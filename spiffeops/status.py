"""A status HTTP endpoint for long-running processes: liveness, readiness and Prometheus metrics.

``GET /healthz`` answers 200 ``ok`` while the process is up; ``GET /readyz`` answers 200 or 503
with the message of the readiness callable; ``GET /metrics`` is the Prometheus text exposition of
a registry. Any other path is 404 and any other method 405. It runs the standard library's
``ThreadingHTTPServer`` on a daemon thread, so it keeps answering while the asyncio loop is busy,
and logs requests through ``logging`` at debug level instead of writing to standard error.

Bind it to loopback (the default) unless something off the host must scrape it: it has no
authentication.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Final, Self
from urllib.parse import urlsplit

import prometheus_client
from prometheus_client import CollectorRegistry

__all__ = ["AddressError", "Readiness", "StatusServer", "parse_host_port"]

_log = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, str]]
"""Answers "is this process ready to serve, and why (not)?" It must be quick and thread-safe."""

DEFAULT_HOST: Final = "127.0.0.1"
_REQUEST_TIMEOUT: Final = 10.0
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME: Final = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_PORT: Final = re.compile(r"[0-9]{1,5}")


class AddressError(ValueError):
    """A listen address is not ``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT``."""


def parse_host_port(text: str, *, default_host: str = DEFAULT_HOST) -> tuple[str, int]:
    """Split a listen address: ``"127.0.0.1:9090"``, ``"[::1]:9090"``, ``"localhost:9090"``, or
    ``":9090"`` for ``default_host`` (loopback) on that port. Port 0 means any free port.
    """
    quoted = json.dumps(text)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise AddressError(f"status: invalid address {quoted}: expected HOST:PORT, [IPV6]:PORT or :PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(
                f"status: invalid address {quoted}: brackets must hold an IPv6 address, got {json.dumps(host)}"
            ) from None
    elif ":" in host:
        raise AddressError(f"status: invalid address {quoted}: an IPv6 address must be in brackets, as in [::1]:9090")
    elif not host:
        host = default_host
    elif not _HOSTNAME.fullmatch(host):
        raise AddressError(f"status: invalid address {quoted}: invalid host {json.dumps(host)}")
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise AddressError(
            f"status: invalid address {quoted}: the port must be a number from 0 to 65535, got {json.dumps(port_text)}"
        )
    return host, int(port_text)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, status: StatusServer) -> None:
        self.address_family = family
        self.status = status
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the host's full name; a status port does not need it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: object, client_address: object) -> None:
        _log.error("status: error while handling a request", exc_info=True, extra={"client": str(client_address)})


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _REQUEST_TIMEOUT
    server_version = "spiffe-status"
    sys_version = ""

    def parse_request(self) -> bool:
        # Runs before the do_<METHOD> lookup, so every method but GET (even unknown ones) gets a 405.
        if not super().parse_request():
            return False
        if self.command != "GET":
            self._respond(405, "method not allowed\n", "text/plain; charset=utf-8", allow="GET")
            return False
        return True

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._respond(200, "ok\n")
        elif path == "/readyz":
            ready, message = self._readiness()
            self._respond(200 if ready else 503, message + "\n")
        elif path == "/metrics":
            body = prometheus_client.generate_latest(self.server.status.registry)
            self._respond(200, body, prometheus_client.CONTENT_TYPE_LATEST)
        else:
            self._respond(404, "not found\n")

    def _readiness(self) -> tuple[bool, str]:
        try:
            return self.server.status.readiness()
        # The probe is caller code run on our thread: whatever it raises means "not ready", with a
        # reason, rather than a dropped connection and a traceback on standard error.
        except Exception as err:  # noqa: BLE001
            _log.error("status: the readiness check failed", exc_info=True)
            return False, f"readiness check failed: {type(err).__name__}: {err}"

    def _respond(
        self, code: int, body: str | bytes, content_type: str = "text/plain; charset=utf-8", *, allow: str = ""
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        _log.debug(
            "status: request",
            extra={
                # A request too malformed to parse has neither a method nor a path.
                "method": self.command,
                "path": getattr(self, "path", None),
                "status": str(code),
                "client": self.client_address[0],
            },
        )

    def log_message(self, format: str, *args: object) -> None:
        _log.debug("status: %s", format % args, extra={"client": self.client_address[0]})


class StatusServer:
    """The status endpoint of one process. Nothing happens until :meth:`start`.

    ``readiness`` is called on the server's threads for every ``/readyz``. ``registry`` is the
    Prometheus registry ``/metrics`` shows; None means prometheus-client's process-wide default
    registry. Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        readiness: Readiness,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.readiness = readiness
        self.registry: CollectorRegistry = registry if registry is not None else prometheus_client.REGISTRY
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when 0 was asked for). Only once started."""
        if self._server is None:
            raise RuntimeError("status: the server is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve on a daemon thread. Raises ``OSError`` if the address cannot be bound."""
        if self._server is not None or self._stopped:
            raise RuntimeError("status: a status server can be started only once")
        family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._server = _Server((self.host, self.port), family, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="spiffeops-status", daemon=True
        )
        self._thread.start()
        host, port = self.address
        _log.debug("status: serving", extra={"host": host, "port": port})

    def stop(self) -> None:
        """Stop serving and close the socket; a stopped server cannot start again. Safe to call more
        than once, or before :meth:`start` (then it does nothing)."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopped = True
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        thread.join()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
