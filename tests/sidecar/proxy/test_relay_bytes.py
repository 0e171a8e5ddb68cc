"""The relay's own buffers, byte for byte.

The relay reads ciphertext and plaintext into buffers shared by every connection of the process,
decrypts into reused scratch memory that it then hands to a transport (or copies out, when
little), and calls OpenSSL through pyOpenSSL's private cffi binding. These tests check what that
could break: many connections at once, in both directions, with writes of every size and slow
readers (so handed-off buffers sit queued while the scratch memory is reused), and one long
stream each way; and that the private names still exist in the installed pyOpenSSL.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import MutableMapping
from typing import Final

import pytest
from OpenSSL import SSL, crypto

from sidecar.proxy import relay
from sidecar.proxy.tls import lib
from tests.sidecar.proxy.test_client_and_transfer import (
    MIB,
    Tally,
    build_chain,
    close_chain,
    receive,
    send,
    start_upstream,
)
from tests.support.ca import TestCA

LONG_MIB: Final = 256
"""Each way, once per loop: four times the 64 MiB of the slow-reader test, still a few seconds."""


@pytest.fixture
async def ca() -> TestCA:
    return TestCA.create("example.org")


def test_the_pyopenssl_internals_the_relay_calls_exist(ca: TestCA) -> None:
    for name in ("SSL_read", "SSL_write", "BIO_read", "BIO_write", "SSL_get_error"):
        assert hasattr(lib, name), name
    context = SSL.Context(SSL.TLS_METHOD)
    conn = SSL.Connection(context, None)
    for name in ("_ssl", "_into_ssl", "_from_ssl", "_raise_ssl_error"):
        assert hasattr(conn, name), name
    # The verify callback (sidecar/proxy/tls.py): its own cffi callback on the context, the
    # connection of an SSL *, the chain as DER, and the refusal's X.509 error.
    for name in (
        "SSL_CTX_set_verify", "X509_STORE_CTX_get_ex_data", "SSL_get_ex_data_X509_STORE_CTX_idx",
        "X509_STORE_CTX_get_error", "X509_STORE_CTX_get_error_depth", "X509_STORE_CTX_set_error",
        "X509_STORE_CTX_get1_chain", "X509_STORE_CTX_get0_cert", "sk_X509_num", "sk_X509_value", "sk_X509_free",
        "X509_free", "X509_up_ref", "BIO_new", "BIO_s_mem", "BIO_get_mem_data", "BIO_free", "i2d_X509_bio",
        "X509_V_ERR_CERT_REJECTED",
    ):  # fmt: skip
        assert hasattr(lib, name), name
    assert hasattr(context, "_context")
    assert isinstance(SSL.Connection._reverse_mapping, MutableMapping)
    assert SSL.Connection._reverse_mapping[conn._ssl] is conn
    assert callable(crypto.X509._from_raw_x509_ptr)


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)  # noqa: S311 - a test pattern


async def send_pieces(writer: asyncio.StreamWriter, data: bytes, seed: int) -> None:
    """Write ``data`` in pieces of random sizes (1 byte to 1 MiB), then FIN."""
    sizes = random.Random(seed)  # noqa: S311 - a test pattern
    view = memoryview(data)
    while view:
        size = sizes.choice((1, 100, 4096, 16 * 1024 - 1, 16 * 1024 + 1, 60_000, 70_000, 300 * 1024, MIB, 2 * MIB))
        writer.write(view[:size])
        view = view[size:]
        await writer.drain()
    writer.write_eof()
    await writer.drain()


async def read_all(reader: asyncio.StreamReader, *, pace: float, seed: int) -> bytes:
    sizes = random.Random(seed)  # noqa: S311 - a test pattern
    received = bytearray()
    await asyncio.sleep(0.2)  # let every connection's buffers fill first
    while data := await reader.read(sizes.choice((1000, 256 * 1024, 1024 * 1024))):
        received += data
        if pace:
            await asyncio.sleep(pace)
    return bytes(received)


async def test_many_connections_at_once_each_get_their_own_bytes(ca: TestCA) -> None:
    count = 8
    size = 6 * MIB + 12345
    received_up: dict[int, bytes] = {}

    async def upstream_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readexactly(1)  # the connection's number
        number = first[0]
        data, _ = await asyncio.gather(
            read_all(reader, pace=0.002 if number % 2 else 0.0, seed=200 + number),
            send_pieces(writer, pattern(1000 + number, size), seed=number),
        )
        received_up[number] = data
        writer.close()

    async def one(number: int) -> bytes:
        reader, writer = await asyncio.open_connection(chain.entry.host, chain.entry.port)
        writer.write(bytes([number]))
        _, down = await asyncio.gather(
            send_pieces(writer, pattern(number, size), seed=100 + number),
            read_all(reader, pace=0.0 if number % 2 else 0.002, seed=300 + number),
        )
        writer.close()
        await writer.wait_closed()
        return down

    upstream, address = await start_upstream(upstream_handler)
    chain = await build_chain(ca, address)
    try:
        downs = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(count))), 60)
        for _ in range(500):
            if len(received_up) == count:
                break
            await asyncio.sleep(0.01)
        for number in range(count):
            assert downs[number] == pattern(1000 + number, size), f"connection {number}, down"
            assert received_up[number] == pattern(number, size), f"connection {number}, up"
    finally:
        await close_chain(chain)
        upstream.close()
        await upstream.wait_closed()


async def test_a_long_stream_each_way_arrives_complete(ca: TestCA) -> None:
    at_upstream = Tally()
    sent_down: list[str] = []

    async def upstream_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        results = await asyncio.gather(receive(reader, at_upstream, stall=0.2, pace=0.0), send(writer, LONG_MIB * MIB))
        sent_down.append(results[1])
        writer.close()

    upstream, address = await start_upstream(upstream_handler)
    chain = await build_chain(ca, address)
    try:
        reader, writer = await asyncio.open_connection(chain.entry.host, chain.entry.port)
        at_client = Tally()
        sent_up, _ = await asyncio.wait_for(
            asyncio.gather(send(writer, LONG_MIB * MIB), receive(reader, at_client, stall=0.2, pace=0.0)), 90
        )
        writer.close()
        await writer.wait_closed()
        for _ in range(500):
            if sent_down:
                break
            await asyncio.sleep(0.01)
        assert (at_upstream.size, at_upstream.sha256) == (LONG_MIB * MIB, sent_up)
        assert (at_client.size, at_client.sha256) == (LONG_MIB * MIB, sent_down[0])
    finally:
        await close_chain(chain)
        upstream.close()
        await upstream.wait_closed()


def test_small_outputs_are_copied_and_large_ones_handed_over() -> None:
    scratch = relay.buffers()
    block = scratch.block
    small = scratch.take(100)
    assert isinstance(small, bytes)
    assert scratch.block is block  # reused
    large = scratch.take(relay.HANDOFF_MIN)
    assert isinstance(large, memoryview)
    assert scratch.block is not block  # the transport owns the old block now
    assert len(large) == relay.HANDOFF_MIN


def test_each_thread_has_its_own_buffers() -> None:
    # Loops in two threads would otherwise read into the same memory at once (recv_into
    # releases the GIL).
    mine = relay.buffers()
    assert relay.buffers() is mine
    theirs: list[relay.Buffers] = []
    thread = threading.Thread(target=lambda: theirs.append(relay.buffers()))
    thread.start()
    thread.join()
    assert theirs[0] is not mine
    assert theirs[0].tls_in.obj is not mine.tls_in.obj
