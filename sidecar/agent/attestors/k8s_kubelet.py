"""The kubelet's read-only ``/pods`` endpoint: one HTTP GET, bounded in time and size.

The agent's event loop serves every workload, so the kubelet is never waited for on it: the GET
runs on asyncio streams under one deadline for the whole exchange (connect, request, answer), so
a kubelet that accepts and then stalls, or drips its answer, costs at most ``timeout`` seconds and
cancelling the call (the agent stopping) ends it at once. Decoding the answer (HTTP framing, then
JSON and the pod list, a few milliseconds for a node's worth of pods) runs in a worker thread.

The request asks the server to close the connection after its answer (``Connection: close``), so
the answer is everything read until EOF, at most ``max_bytes`` of it; its framing (status line,
headers, a ``Content-Length``, chunked or close-delimited body) is parsed by the standard
library's :class:`http.client.HTTPResponse` over those recorded bytes. Only ``http://`` URLs are
taken: the kubelet's read-only port (10255) speaks plain HTTP and needs no credentials.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import socket
from dataclasses import dataclass
from typing import Final, cast
from urllib.parse import urlsplit

from sidecar.agent.attestors.k8s_pods import PodList, PodListError, parse_pod_list
from spiffecore.errors import quote

DEFAULT_TIMEOUT: Final = 5.0
MAX_RESPONSE_BYTES: Final = 64 << 20  # a node's pods take a few MiB at most; Kubernetes allows 110 by default
_READ_SIZE: Final = 256 << 10
_HEADER_ALLOWANCE: Final = 64 << 10  # status line, headers and chunk sizes, beyond the body's limit
_QUOTED_BODY: Final = 200  # bytes of an error answer's body shown in the error


class KubeletError(Exception):
    """The kubelet could not be reached, or its answer was not a pod list; the message says which."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PodsURL:
    """Where to GET the pod list: ``http://host[:port]/path[?query]``."""

    url: str
    host: str
    port: int
    target: str
    host_header: str


def parse_pods_url(url: str) -> PodsURL:
    """``ValueError`` naming the rule unless ``url`` is a plain ``http://`` URL with a host."""
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ValueError(f"pods_url must not contain spaces or control characters: {quote(url)}")
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"pods_url must be an http:// URL (the kubelet's read-only port): {quote(url)}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"pods_url must not carry credentials: {quote(parts.hostname or '')}")
    try:
        port = parts.port or 80
    except ValueError as err:
        raise ValueError(f"pods_url has an invalid port: {quote(url)}") from err
    if not parts.hostname:
        raise ValueError(f"pods_url has no host: {quote(url)}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return PodsURL(url=url, host=parts.hostname, port=port, target=target, host_header=parts.netloc)


class _Recorded:
    """A received answer, in the shape of the socket :class:`http.client.HTTPResponse` reads from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


def response_body(raw: bytes) -> bytes:
    """The body of a ``200`` HTTP answer, or :class:`KubeletError` saying what the answer was instead."""
    response = http.client.HTTPResponse(cast(socket.socket, _Recorded(raw)), method="GET")
    try:
        response.begin()
        body = response.read()
    except (http.client.HTTPException, ValueError) as err:
        if not raw:
            raise KubeletError("it closed the connection without answering") from err
        raise KubeletError(
            f"its answer is not valid HTTP ({type(err).__name__}): {quote(str(err), limit=100)}"
        ) from err
    if response.status != 200:
        shown = quote(body[:_QUOTED_BODY].decode("utf-8", "replace"))
        if len(body) > _QUOTED_BODY:
            shown += f"... ({len(body)} bytes)"
        raise KubeletError(f"it answered {response.status} {quote(response.reason)}: {shown}")
    return body


def decode_pod_list(raw: bytes) -> PodList:
    """The pod list in a recorded HTTP answer (blocking: call it in a worker thread for large ones)."""
    try:
        return parse_pod_list(response_body(raw))
    except PodListError as err:
        raise KubeletError(str(err)) from err


class KubeletClient:
    """GETs the pod list from the kubelet at ``pods_url`` (see the module's documentation)."""

    def __init__(self, pods_url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = MAX_RESPONSE_BYTES) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        self._url = parse_pods_url(pods_url)
        self._timeout = timeout
        self._max_bytes = max_bytes

    @property
    def url(self) -> str:
        return self._url.url

    async def pod_list(self) -> PodList:
        """The kubelet's pods, or :class:`KubeletError` (which names the URL)."""
        try:
            raw = await self._get()
            return await asyncio.to_thread(decode_pod_list, raw)
        except KubeletError as err:
            raise KubeletError(f"{self._url.url}: {err}") from err

    async def _get(self) -> bytes:
        url = self._url
        request = (
            f"GET {url.target} HTTP/1.1\r\nHost: {url.host_header}\r\nAccept: application/json\r\n"
            "User-Agent: spiffe-agent\r\nConnection: close\r\n\r\n"
        ).encode("ascii", "strict")
        limit = self._max_bytes + _HEADER_ALLOWANCE
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._timeout):
                reader, writer = await asyncio.open_connection(url.host, url.port)
                writer.write(request)
                await writer.drain()
                chunks: list[bytes] = []
                size = 0
                while chunk := await reader.read(_READ_SIZE):
                    size += len(chunk)
                    if size > limit:
                        raise KubeletError(f"its answer is larger than {self._max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except TimeoutError as err:
            raise KubeletError(f"no complete answer within {self._timeout:g} s") from err
        except OSError as err:
            raise KubeletError(f"cannot reach it: {err.strerror or err}") from err
        finally:
            if writer is not None:
                # The server has closed (Connection: close) or is given up on: nothing to wait for.
                writer.transport.abort()
