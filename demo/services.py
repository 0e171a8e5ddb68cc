"""The demo's services: tiny HTTP servers that know nothing of TLS or SPIFFE.

    python -m demo.services backend
    python -m demo.services frontend --upstream 127.0.0.1:15001 [--legacy-upstream 127.0.0.1:15002]
    python -m demo.services legacy

Each binds 127.0.0.1 on a port the kernel picks, prints ``listening on 127.0.0.1:PORT`` (its only
line on stdout), logs requests on stderr, and stops on SIGTERM or SIGINT with exit code 0.

- ``backend`` answers ``GET /`` with JSON naming the caller its Envoy sidecar vouched for: the
  ``URI=`` of the ``x-forwarded-client-cert`` header, which that sidecar sets after mTLS.
- ``frontend`` answers ``GET /`` by calling the backend in plain HTTP through ``--upstream``, its
  outbound Envoy sidecar, which adds the mTLS; it returns the backend's answer inside its own.
  With ``--legacy-upstream`` it also answers ``GET /legacy``, calling the legacy service the same
  way, through another outbound sidecar of its own.
- ``legacy`` answers ``GET /`` with a fixed JSON greeting: a service that cannot be changed, put
  behind ``spiffe-proxy`` (server mode), which does the mTLS and the authorization for it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Final

UPSTREAM_TIMEOUT: Final = 5.0
XFCC: Final = "x-forwarded-client-cert"


def caller_from_xfcc(header: str | None) -> str | None:
    """The ``URI=`` element of the first entry of an ``x-forwarded-client-cert`` header."""
    if not header:
        return None
    first = header.split(",")[0]
    for element in first.split(";"):
        key, _, value = element.partition("=")
        if key.strip().lower() == "uri":
            return value.strip().strip('"') or None
    return None


class _Handler(BaseHTTPRequestHandler):
    server_version = "demo-service"
    upstream: str | None = None

    def _send_json(self, status: int, document: dict[str, Any]) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class BackendHandler(_Handler):
    def do_GET(self) -> None:
        xfcc = self.headers.get(XFCC)
        self._send_json(
            200,
            {
                "service": "backend",
                "message": "hello from the backend",
                "caller": caller_from_xfcc(xfcc),
                XFCC: xfcc,
            },
        )


class LegacyHandler(_Handler):
    def do_GET(self) -> None:
        self._send_json(200, {"service": "legacy", "message": "hello from the legacy service (plain HTTP, no TLS)"})


class FrontendHandler(_Handler):
    legacy_upstream: str | None = None

    def do_GET(self) -> None:
        if self.path == "/legacy":
            if self.legacy_upstream is None:
                self._send_json(404, {"service": "frontend", "error": "no --legacy-upstream"})
                return
            self._call("legacy", self.legacy_upstream)
            return
        assert self.upstream is not None
        self._call("backend", self.upstream)

    def _call(self, name: str, upstream: str) -> None:
        """``GET /`` on ``upstream`` (an outbound sidecar); its JSON answer inside ours, under ``name``."""
        url = f"http://{upstream}/"
        try:
            with urllib.request.urlopen(url, timeout=UPSTREAM_TIMEOUT) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:  # the sidecar answered, with an error (e.g. 503: no mTLS)
            detail = err.read().decode(errors="replace").strip()
            self._send_json(502, {"service": "frontend", "error": f"{name} call failed: {err.code} {detail}"})
            return
        except (OSError, ValueError) as err:
            self._send_json(502, {"service": "frontend", "error": f"{name} call failed: {err}"})
            return
        self._send_json(200, {"service": "frontend", name: answer})


def serve(handler: type[_Handler]) -> int:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"listening on {host!s}:{port}", flush=True)

    def stop(signum: int, _frame: FrameType | None) -> None:
        print(f"{signal.Signals(signum).name}: stopping", file=sys.stderr, flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with server:
        server.serve_forever(poll_interval=0.1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.services", description="The demo's HTTP services.")
    roles = parser.add_subparsers(dest="role", required=True)
    roles.add_parser("backend", help="answer with the caller's SPIFFE ID, as the sidecar forwarded it")
    frontend = roles.add_parser("frontend", help="call the backend through the outbound sidecar")
    frontend.add_argument("--upstream", required=True, metavar="HOST:PORT", help="the outbound sidecar")
    frontend.add_argument(
        "--legacy-upstream", metavar="HOST:PORT", help="the outbound sidecar to the legacy service (GET /legacy)"
    )
    roles.add_parser("legacy", help="a plain HTTP service that knows nothing of TLS, for spiffe-proxy to wrap")
    args = parser.parse_args(argv)
    if args.role == "backend":
        return serve(BackendHandler)
    if args.role == "legacy":
        return serve(LegacyHandler)
    handler = type("Frontend", (FrontendHandler,), {"upstream": args.upstream, "legacy_upstream": args.legacy_upstream})
    return serve(handler)


if __name__ == "__main__":
    sys.exit(main())
