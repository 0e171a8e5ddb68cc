"""Both plaintext ends of a multi-GiB transfer through the proxies, in a process of their own.

    python -m tests.sidecar.proxy.bulk_peer TOTAL TAIL

Run by ``test_transfer_gib.py``. The client end connects to the client-mode proxy, the upstream
end listens for the server-mode proxy; on each connection one thread sends ``TOTAL`` bytes then
FIN, and another receives to the end, so both directions run at once.

Why a process of its own: the proxies under test run on the test's event loop, which holds the
GIL whenever it runs (uvloop even makes its system calls with it held). Senders and receivers in
threads of that process would wait for the GIL after every ``recv`` and every hash, and cost
minutes instead of seconds. Here they have the GIL to themselves and do little per byte: the
payload is one block sent again and again with ``sendall`` on a blocking socket (one system call
per block), receives are ``recv_into`` with ``MSG_WAITALL`` into one 4 MiB buffer, and the
SHA-256 runs in C (``hashlib`` releases the GIL). The payload comes from :func:`pattern`, so the
test computes the digest the receivers must find on its own side, once.

Paused readers: each receiver stops reading for ``STALL`` seconds every ``STALL_EVERY`` bytes,
and again, for as long as the test wants, when ``TAIL`` bytes are left: its receive buffer is
kept small (``SO_RCVBUF``), so the proxy in front of it fills its write buffer and pauses its TLS
reader, and the sender's last bytes, the close_notify and the FIN arrive while it is paused. The
test checks that this is so, then lets the receiver go on.

Protocol, one JSON object per line. Out: ``{"upstream": PORT}``; in: ``{"entry": PORT}`` (the
client-mode proxy, on 127.0.0.1); out, once per direction: ``{"stalled": "up"|"down",
"received": N}``; in: ``{"go": "up"|"down"}``; out if a socket fails: ``{"error": TEXT}``; out
at the end: ``{"result": {direction: {"size": N, "sha256": HEX, "seconds": S}}, "errors": [...]}``.
``up`` is client to upstream, ``down`` upstream to client.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import sys
import threading
import time
from typing import Any, Final

BLOCK: Final = 4 * 1024 * 1024 + 7  # not a multiple of any buffer size of the proxy
SEED: Final = 7
CHUNK: Final = 4 * 1024 * 1024
RECEIVE_BUFFER: Final = 256 * 1024  # the kernel doubles it; small, so the proxy in front fills up
STALL_EVERY: Final = 256 * 1024 * 1024
STALL: Final = 0.02
GO_TIMEOUT: Final = 60.0


def pattern() -> bytes:
    """The block every sender repeats (the test builds the same one to know the digests)."""
    return random.Random(SEED).randbytes(BLOCK)  # noqa: S311 - a test pattern, not a secret


def expected_sha256(total: int) -> str:
    """The SHA-256 of the first ``total`` bytes of the pattern repeated."""
    block = memoryview(pattern())
    digest = hashlib.sha256()
    whole, rest = divmod(total, BLOCK)
    for _ in range(whole):
        digest.update(block)
    digest.update(block[:rest])
    return digest.hexdigest()


class Peer:
    """The two connections, four threads, and the lines exchanged with the test."""

    def __init__(self, total: int, tail: int) -> None:
        self.total = total
        self.tail = tail
        self.block = pattern()
        self.go = {"up": threading.Event(), "down": threading.Event()}
        self.results: dict[str, dict[str, Any]] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def emit(self, message: dict[str, Any]) -> None:
        with self._lock:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    def send(self, sock: socket.socket) -> None:
        view = memoryview(self.block)
        sent = 0
        while sent < self.total:
            size = min(BLOCK, self.total - sent)
            sock.sendall(view[:size])
            sent += size
        sock.shutdown(socket.SHUT_WR)  # FIN: the proxy sends close_notify, then FIN

    def receive(self, sock: socket.socket, direction: str) -> None:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        digest = hashlib.sha256()
        size = 0
        began = time.monotonic()
        next_stall = STALL_EVERY
        before_tail = self.total - self.tail
        ended = False
        while size < before_tail:  # exactly up to the tail, so the stall starts where it should
            got = sock.recv_into(view, min(CHUNK, before_tail - size), socket.MSG_WAITALL)
            if got == 0:
                ended = True
                break
            digest.update(view[:got])
            size += got
            if size >= next_stall:
                next_stall += STALL_EVERY
                time.sleep(STALL)  # not reading: the proxy in front pauses
        self.emit({"stalled": direction, "received": size})
        if not self.go[direction].wait(GO_TIMEOUT):
            self.errors.append(f"{direction}: the test never said go")
        while not ended:
            got = sock.recv_into(view, CHUNK, socket.MSG_WAITALL)
            if got == 0:
                break
            digest.update(view[:got])
            size += got
        self.results[direction] = {"size": size, "sha256": digest.hexdigest(), "seconds": time.monotonic() - began}

    def run(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)  # accepted sockets inherit it
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.emit({"upstream": listener.getsockname()[1]})
        entry = int(json.loads(sys.stdin.readline())["entry"])
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        client.connect(("127.0.0.1", entry))
        upstream, _ = listener.accept()  # once the server-mode proxy has verified the client-mode one
        listener.close()
        threads = [
            threading.Thread(target=self._guard, args=(self.send, client)),
            threading.Thread(target=self._guard, args=(self.receive, upstream, "up")),
            threading.Thread(target=self._guard, args=(self.send, upstream)),
            threading.Thread(target=self._guard, args=(self.receive, client, "down")),
        ]
        for thread in threads:
            thread.start()
        while not all(event.is_set() for event in self.go.values()):
            line = sys.stdin.readline()
            if not line:
                break  # the test went away
            self.go[json.loads(line)["go"]].set()
        for thread in threads:
            thread.join()
        client.close()
        upstream.close()
        self.emit({"result": self.results, "errors": self.errors})

    def _guard(self, work: Any, *args: Any) -> None:
        try:
            work(*args)
        except OSError as err:  # reported to the test at once, which fails with it
            self.errors.append(f"{work.__name__}: {err}")
            self.emit({"error": self.errors[-1]})
            for event in self.go.values():  # nothing will stall any more
                event.set()


def main(argv: list[str]) -> int:
    total, tail = int(argv[1]), int(argv[2])
    Peer(total, tail).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
