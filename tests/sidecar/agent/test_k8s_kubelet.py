"""The kubelet client against a real HTTP server on 127.0.0.1 that serves recorded pod lists, and misbehaves."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.agent.attestors.k8s_kubelet import (
    KubeletClient,
    KubeletError,
    PodsURL,
    decode_pod_list,
    parse_pods_url,
    response_body,
)
from sidecar.agent.attestors.k8s_pods import PodList
from tests.sidecar.agent.kubelet import FIXTURES, FakeKubelet, fixture, running_kubelet

API: Final = "14c2529eb4498c5d1ffd6915d05bf58a91bdda796af59f41d480d11c099d0479"


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    with running_kubelet() as server:
        yield server


async def failure(client: KubeletClient) -> str:
    with pytest.raises(KubeletError) as raised:
        await client.pod_list()
    return str(raised.value)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("mode", ["length", "chunked", "close"])
async def test_the_recorded_list_whatever_the_framing(kubelet: FakeKubelet, mode: str) -> None:
    kubelet.serve((FIXTURES / "kubelet-pods-containerd.json").read_bytes(), mode=mode)  # type: ignore[arg-type]
    pods = await KubeletClient(kubelet.url).pod_list()
    assert [pod.name for pod in pods.pods][:2] == ["api-7c9d8f6b5-x2k4p", "batch-28453920-6wq9z"]
    assert pods.find(API) is not None
    assert kubelet.requests == ["/pods"]


async def test_a_large_list_in_many_chunks(kubelet: FakeKubelet) -> None:
    document = fixture("containerd")
    template = document["items"][1]
    document["items"] = [template | {"metadata": template["metadata"] | {"uid": str(n)}} for n in range(300)]
    kubelet.serve(document, mode="chunked")
    pods = await KubeletClient(kubelet.url).pod_list()
    assert len(pods.pods) == 300
    assert pods.skipped[0].startswith("container ID ")  # all 300 claim one container ID: ambiguous


async def test_the_path_and_query_are_sent(kubelet: FakeKubelet) -> None:
    kubelet.serve(fixture("empty"))
    await KubeletClient(kubelet.url.replace("/pods", "/api/pods?limit=5")).pod_list()
    assert kubelet.requests == ["/api/pods?limit=5"]


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (404, b"404 page not found\n", 'it answered 404 "Not Found": "404 page not found\\n"'),
        (401, b"Unauthorized", 'it answered 401 "Unauthorized": "Unauthorized"'),
        (500, b"x" * 1000, f'it answered 500 "Internal Server Error": "{"x" * 200}"... (1000 bytes)'),
    ],
)
async def test_error_statuses(kubelet: FakeKubelet, status: int, body: bytes, message: str) -> None:
    kubelet.serve(body, status=status)
    assert await failure(KubeletClient(kubelet.url)) == f"{kubelet.url}: {message}"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>", "the answer is not JSON: Expecting value: line 1 column 1 (char 0)"),
        (b'{"kind": "Status", "code": 403}', 'the answer is not a PodList: its kind is "Status"'),
        (b"[]", "the answer is not a PodList: a JSON array, not an object"),
    ],
)
async def test_answers_that_are_no_pod_list(kubelet: FakeKubelet, body: bytes, message: str) -> None:
    kubelet.serve(body)
    assert await failure(KubeletClient(kubelet.url)) == f"{kubelet.url}: {message}"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "it closed the connection without answering"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", 'its answer is not valid HTTP (BadStatusLine): "SSH-2.0-OpenSSH_9.6\\r\\n"'),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}",
            'its answer is not valid HTTP (IncompleteRead): "IncompleteRead(2 bytes read, 98 more expected)"',
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n{}",
            'its answer is not valid HTTP (IncompleteRead): "IncompleteRead(0 bytes read)"',
        ),
    ],
)
async def test_answers_that_are_no_http(kubelet: FakeKubelet, raw: bytes, message: str) -> None:
    kubelet.serve(raw, mode="raw")
    assert await failure(KubeletClient(kubelet.url)) == f"{kubelet.url}: {message}"


async def test_a_huge_answer_is_cut_off(kubelet: FakeKubelet) -> None:
    body = (FIXTURES / "kubelet-pods-containerd.json").read_bytes() + b" " * (200 << 10)
    kubelet.serve(body, mode="chunked")
    message = await failure(KubeletClient(kubelet.url, max_bytes=100 << 10))
    assert message == f"{kubelet.url}: its answer is larger than 102400 bytes"
    assert len((await KubeletClient(kubelet.url, max_bytes=1 << 20).pod_list()).pods) == 4


async def test_a_kubelet_that_never_answers_costs_the_timeout_and_blocks_nothing(kubelet: FakeKubelet) -> None:
    kubelet.serve(b"", mode="stall")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    message = await failure(KubeletClient(kubelet.url, timeout=0.3))
    elapsed = time.monotonic() - started
    ticker.cancel()
    assert message == f"{kubelet.url}: no complete answer within 0.3 s"
    assert 0.3 <= elapsed < 2.0
    assert ticks >= 10  # the loop kept running while the kubelet was waited for


async def test_a_call_is_cancelled_at_once(kubelet: FakeKubelet) -> None:
    kubelet.serve(b"", mode="stall")
    call = asyncio.create_task(KubeletClient(kubelet.url, timeout=30).pod_list())
    while kubelet.request_count == 0:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert time.monotonic() - started < 0.5


async def test_no_kubelet_listening() -> None:
    port = closed_port()
    message = await failure(KubeletClient(f"http://127.0.0.1:{port}/pods"))
    assert message.startswith(f"http://127.0.0.1:{port}/pods: cannot reach it: ")


@pytest.mark.parametrize(("timeout", "max_bytes"), [(0, 1), (-1, 1), (1, 0)])
def test_client_limits_are_checked(timeout: float, max_bytes: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        KubeletClient("http://127.0.0.1:10255/pods", timeout=timeout, max_bytes=max_bytes)


# --- the URL ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "http://127.0.0.1:10255/pods",
            PodsURL(url="http://127.0.0.1:10255/pods", host="127.0.0.1", port=10255, target="/pods",
                    host_header="127.0.0.1:10255"),
        ),
        (
            "http://localhost/pods",
            PodsURL(url="http://localhost/pods", host="localhost", port=80, target="/pods", host_header="localhost"),
        ),
        (
            "http://[::1]:10255/pods?x=1",
            PodsURL(url="http://[::1]:10255/pods?x=1", host="::1", port=10255, target="/pods?x=1",
                    host_header="[::1]:10255"),
        ),
        (
            "http://node-1.internal:10255",
            PodsURL(url="http://node-1.internal:10255", host="node-1.internal", port=10255, target="/",
                    host_header="node-1.internal:10255"),
        ),
    ],
)  # fmt: skip
def test_pods_urls(url: str, expected: PodsURL) -> None:
    assert parse_pods_url(url) == expected


NOT_HTTP: Final = "pods_url must be an http:// URL (the kubelet's read-only port)"
NO_SPACES: Final = "pods_url must not contain spaces or control characters"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://127.0.0.1:10250/pods", f'{NOT_HTTP}: "https://127.0.0.1:10250/pods"'),
        ("127.0.0.1:10255/pods", f'{NOT_HTTP}: "127.0.0.1:10255/pods"'),
        ("", f'{NOT_HTTP}: ""'),
        ("http:///pods", 'pods_url has no host: "http:///pods"'),
        ("http://127.0.0.1:99999/pods", 'pods_url has an invalid port: "http://127.0.0.1:99999/pods"'),
        ("http://127.0.0.1:x/pods", 'pods_url has an invalid port: "http://127.0.0.1:x/pods"'),
        ("http://user:secret@127.0.0.1/pods", 'pods_url must not carry credentials: "127.0.0.1"'),
        ("http://127.0.0.1/pods\r\nX-Evil: 1", f'{NO_SPACES}: "http://127.0.0.1/pods\\r\\nX-Evil: 1"'),
        ("http://127.0.0.1/my pods", f'{NO_SPACES}: "http://127.0.0.1/my pods"'),
    ],
)
def test_bad_pods_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=r".") as raised:
        parse_pods_url(url)
    assert str(raised.value) == message


# --- decoding recorded answers -----------------------------------------------------------------------


def test_decoding_a_recorded_answer() -> None:
    body = (FIXTURES / "kubelet-pods-crio.json").read_bytes()
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: Tue, 14 May 2024 11:20:00 GMT\r\n"
    raw += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    pods = decode_pod_list(raw)
    assert isinstance(pods, PodList)
    assert [pod.name for pod in pods.pods] == ["frontend-6d5c4b3a2-zp9qx"]


@given(st.binary(max_size=300))
def test_arbitrary_answers_never_crash(raw: bytes) -> None:
    result: bytes | str
    try:
        result = response_body(raw)
    except KubeletError as err:
        result = str(err)
    assert isinstance(result, bytes) or result.startswith(("it ", "its "))


@given(st.binary(max_size=200))
def test_arbitrary_bodies_after_a_good_head_never_crash(body: bytes) -> None:
    result: PodList | str
    try:
        result = decode_pod_list(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    except KubeletError as err:
        result = str(err)
    assert isinstance(result, PodList) or result.startswith("the answer is not ")
