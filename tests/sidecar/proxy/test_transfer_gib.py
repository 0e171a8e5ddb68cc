"""2 GiB each way at once through client mode and server mode, on the default loop and on uvloop.

Topology: the client end of :mod:`tests.sidecar.proxy.bulk_peer` -> :class:`ProxyClient`
(plaintext in, mTLS out) -> :class:`ProxyServer` (mTLS in, plaintext out) -> the upstream end of
``bulk_peer``, one connection, both directions at once. The proxies run here, on the loop under
test (``conftest.py`` runs every async test on both); the ends run in a process of their own so
they cost little and never wait for this loop's GIL (``bulk_peer`` says why).

Each direction ends the way uvloop 0.23's own TLS transport loses data (ARCHITECTURE.md section
5): close_notify then FIN arriving while the receiving proxy's TLS reader is paused. The receiver
stops reading when its last ``TAIL`` bytes are due and stays still until this test has seen, on
the proxies' own objects, that the sending proxy has handed its last record, its close_notify
and its FIN to the kernel (its plaintext side ended, its TLS write buffer empty) while the
receiving proxy is not reading and has not yet decrypted the tail. Only then does the receiver go
on. Every byte is checked: size and SHA-256 of each direction, against the digest of the payload
computed here on its own.

The 64 MiB cases in ``test_client_and_transfer.py`` pace their readers all along; this one is
about volume: 2 GiB crosses every counter and buffer boundary a 32-bit size or a 1 GiB
threshold could hide behind.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from sidecar.proxy.address import Address
from sidecar.proxy.client import ProxyClient
from sidecar.proxy.policy import Policy
from sidecar.proxy.relay import Relay, Timeouts, TLSSide
from sidecar.proxy.server import ProxyServer
from sidecar.proxy.tls import ProxyTLS
from sidecar.workload.source import X509Source
from tests.sidecar.proxy.bulk_peer import expected_sha256
from tests.sidecar.proxy.support import FedSource, context_of
from tests.support.ca import TestCA

ROOT: Final = Path(__file__).resolve().parents[3]
MIB: Final = 1024 * 1024
GIB: Final = 1024 * MIB
TOTAL: Final = 2 * GIB
TAIL: Final = 8 * MIB
"""Bytes left when a receiver stops. More than the hop between it and the proxy in front holds
(its 512 KiB receive buffer, the proxy's send buffer of at most 4 MiB, Linux's default
``tcp_wmem`` ceiling, and the proxy's write buffer), so that proxy pauses with ~3.5 MiB still to
read; less than the hops behind that proxy hold, so the sender gets to its FIN meanwhile (16 MiB
did not fit there)."""
RUN_TIMEOUT: Final = 100.0
PAUSE_TIMEOUT: Final = 20.0
CLIENT_ID: Final = "spiffe://example.org/client"
SERVER_ID: Final = "spiffe://example.org/server"


@functools.cache
def payload_sha256() -> str:
    """The SHA-256 each receiver must find (the same payload goes both ways); computed once."""
    return expected_sha256(TOTAL)


@dataclass
class Chain:
    client: ProxyClient
    server: ProxyServer
    sources: list[X509Source]

    async def close(self) -> None:
        await self.client.drain(5.0)
        await self.server.drain(5.0)
        for source in self.sources:
            await source.close()


async def build_chain(ca: TestCA, upstream: Address) -> Chain:
    timeouts = Timeouts(handshake=10.0, connect=10.0, close=60.0)
    server_source = await FedSource().start(context_of(ca.mint("/server").svid(), ca.x509_bundle()))
    client_source = await FedSource().start(context_of(ca.mint("/client").svid(), ca.x509_bundle()))
    server = ProxyServer(
        listen=Address.parse("127.0.0.1:0"),
        upstream=upstream,
        tls=ProxyTLS(server_source, Policy.from_rules(allow_id=[CLIENT_ID]).authorizer(), server_side=True),
        timeouts=timeouts,
    )
    await server.start()
    client = ProxyClient(
        listen=Address.parse("127.0.0.1:0"),
        upstream=server.bound,
        tls=ProxyTLS(client_source, Policy.from_rules(allow_id=[SERVER_ID]).authorizer(), server_side=False),
        timeouts=timeouts,
    )
    await client.start()
    return Chain(client, server, [server_source, client_source])


def relays(chain: Chain) -> tuple[Relay | None, Relay | None]:
    """The connection's relay in each proxy, (client mode's, server mode's); None once it is closed.

    Read from the listeners' connections in flight (private, like the pyOpenSSL internals
    ``test_relay_bytes.py`` checks): nothing public says whether a reader is paused.
    """
    client = [c for c in chain.client._in_flight if isinstance(c, Relay)]
    server = [c.relay for c in chain.server._in_flight if isinstance(c, TLSSide) and c.relay is not None]
    assert len(client) <= 1, client
    assert len(server) <= 1, server
    return (client[0] if client else None), (server[0] if server else None)


@dataclass(frozen=True)
class TailSeen:
    """What the test saw before letting a receiver go on."""

    sender_done: bool  # the sending proxy's plaintext side has ended: close_notify queued, FIN asked for
    sender_flushed: bool  # its TLS write buffer is empty: records, close_notify and FIN are in the kernel
    receiver_paused: bool  # the receiving proxy's TLS transport is not reading
    undecrypted: int  # bytes the receiving proxy has not yet decrypted: the tail waits behind the pause

    @property
    def scenario(self) -> bool:
        return self.sender_done and self.sender_flushed and self.receiver_paused and self.undecrypted > 0


def tail_state(chain: Chain, direction: str) -> TailSeen:
    client, server = relays(chain)
    # up: the client-mode proxy encrypts, the server-mode one decrypts; down: the other way round.
    sender, receiver = (client, server) if direction == "up" else (server, client)
    if receiver is None or receiver.tls is None or receiver.tls.transport is None:
        return TailSeen(sender_done=False, sender_flushed=False, receiver_paused=False, undecrypted=0)
    if sender is None:
        # The sending proxy's connection is gone: both its directions ended and its TLS
        # transport closed once its buffer was flushed (an abort would lose bytes, caught below).
        done = flushed = True
    else:
        assert sender.tls is not None
        assert sender.tls.transport is not None
        done = sender.up_done
        flushed = sender.tls.transport.get_write_buffer_size() == 0
    return TailSeen(
        sender_done=done,
        sender_flushed=flushed,
        receiver_paused=not receiver.tls.transport.is_reading() and not receiver.down_done,
        undecrypted=TOTAL - receiver.from_tls,
    )


async def paused_at_the_end(chain: Chain, direction: str) -> TailSeen:
    """Wait until the stream's end has reached a paused receiving proxy; what was seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PAUSE_TIMEOUT
    seen = tail_state(chain, direction)
    while not seen.scenario and loop.time() < deadline:
        await asyncio.sleep(0.01)
        seen = tail_state(chain, direction)
    await asyncio.sleep(0.1)  # the kernel delivers what the sender handed it (loopback: at once)
    return seen


async def test_two_gib_each_way_ending_in_close_notify_and_fin_while_paused() -> None:
    ca = TestCA.create("example.org")
    want = await asyncio.to_thread(payload_sha256)
    peer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.sidecar.proxy.bulk_peer",
        str(TOTAL),
        str(TAIL),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    chain: Chain | None = None

    async def read() -> dict[str, Any]:
        assert peer.stdout is not None
        assert peer.stderr is not None
        line = await peer.stdout.readline()
        if not line:
            await peer.wait()
            stderr = (await peer.stderr.read()).decode(errors="replace")
            pytest.fail(f"bulk_peer ended (exit code {peer.returncode}) early:\n{stderr}")
        message: dict[str, Any] = json.loads(line)
        return message

    def tell(message: dict[str, Any]) -> None:
        assert peer.stdin is not None
        peer.stdin.write(json.dumps(message).encode() + b"\n")

    seen: dict[str, TailSeen] = {}
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            upstream = Address(host="127.0.0.1", port=(await read())["upstream"])
            chain = await build_chain(ca, upstream)
            tell({"entry": chain.client.bound.port})
            while True:
                message = await read()
                if "error" in message:
                    pytest.fail(f"bulk_peer: {message['error']}")
                if "result" in message:
                    break
                direction = message["stalled"]
                seen[direction] = await paused_at_the_end(chain, direction)
                tell({"go": direction})
            assert await peer.wait() == 0
    finally:
        if peer.returncode is None:
            peer.kill()
            await peer.wait()
        if chain is not None:
            await chain.close()

    assert message["errors"] == []
    results = message["result"]
    for direction in ("up", "down"):
        assert seen[direction].scenario, (direction, seen[direction])
        assert (results[direction]["size"], results[direction]["sha256"]) == (TOTAL, want), direction
