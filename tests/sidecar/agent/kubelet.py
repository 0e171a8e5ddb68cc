"""A stand-in for the kubelet's read-only ``/pods`` endpoint: a real HTTP server on 127.0.0.1.

It serves recorded pod lists (``fixtures/kubelet-pods-*.json``, in the kubelet's ``PodList`` form)
and, to test the agent's side, misbehaves on request: an error status, a chunked or
close-delimited body (as Go's net/http sends large answers), raw bytes that are not HTTP, an
answer that never comes. It runs in a thread of its own, so tests that block (starting an agent
process) and async tests can both use it.
"""

from __future__ import annotations

import copy
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

FIXTURES: Final = Path(__file__).parent / "fixtures"

Mode: TypeAlias = Literal["length", "chunked", "close", "raw", "stall"]


def fixture(name: str) -> dict[str, Any]:
    """A recorded pod list, ``fixtures/kubelet-pods-<name>.json``, decoded (a fresh copy each time)."""
    document: dict[str, Any] = json.loads((FIXTURES / f"kubelet-pods-{name}.json").read_text())
    return copy.deepcopy(document)


class FakeKubelet:
    """Serves ``body`` at any path with ``status`` in the way ``mode`` says; counts requests.

    ``length``: a ``Content-Length`` body; ``chunked``: ``Transfer-Encoding: chunked`` in 4 KiB
    chunks; ``close``: no length, the body ends when the connection closes; ``raw``: ``body`` is
    written as it is (no status line) and the connection closed; ``stall``: the request is read
    and nothing is answered until the server stops.
    """

    def __init__(self) -> None:
        self.body = json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []}).encode()
        self.status = 200
        self.mode: Mode = "length"
        self.requests: list[str] = []
        self._released = threading.Event()
        self._lock = threading.Lock()
        kubelet = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                kubelet._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-kubelet", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/pods"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def serve(self, document: dict[str, Any] | bytes, *, status: int = 200, mode: Mode = "length") -> None:
        """Answer the next requests with ``document`` (JSON-encoded unless bytes)."""
        self.body = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.status = status
        self.mode = mode

    def start(self) -> FakeKubelet:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(handler.path)
        body, status, mode = self.body, self.status, self.mode
        handler.close_connection = True
        if mode == "stall":
            self._released.wait(timeout=60)
            return
        if mode == "raw":
            handler.wfile.write(body)
            return
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        if mode == "length":
            handler.send_header("Content-Length", str(len(body)))
        elif mode == "chunked":
            handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Connection", "close")
        handler.end_headers()
        if mode == "chunked":
            for start in range(0, len(body), 4096):
                chunk = body[start : start + 4096]
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            handler.wfile.write(b"0\r\n\r\n")
        else:
            handler.wfile.write(body)


@contextmanager
def running_kubelet() -> Iterator[FakeKubelet]:
    kubelet = FakeKubelet().start()
    try:
        yield kubelet
    finally:
        kubelet.stop()
