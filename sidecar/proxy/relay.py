"""The hot path: one proxied connection, a TLS side and a plaintext side, bytes copied both ways.

Both sides are plain asyncio transports. The TLS side's records go through a pyOpenSSL
connection on memory BIOs (:class:`TLSSide`), so no event loop's TLS transport is involved: the
same code is correct on the default loop and on uvloop, whose TLS transport (0.23) loses the
tail of a stream that ends with close_notify and FIN while reading is paused.

Per direction:

- TLS to plaintext: the TLS transport reads ciphertext into a buffer shared by the thread
  (``BufferedProtocol``), which goes into the BIO at once; ``SSL_read`` decrypts record after
  record into one block of scratch memory (up to 256 KiB), handed to one ``write`` of the
  plaintext transport. When the plaintext transport's buffer passes its high-water mark the TLS
  transport stops reading; the records left in the BIO wait there, and are drained when it
  resumes.
- Plaintext to TLS: a :class:`PlainSide` (``BufferedProtocol``) reads into a 256 KiB buffer
  shared by the thread, ``SSL_write`` encrypts it into the BIO record by record, and the records
  go out in one ``write`` (read from the BIO into the scratch block). A full TLS write buffer
  pauses the plaintext reader.

Copies: OpenSSL is called through pyOpenSSL's cffi binding on these buffers (``tls.lib``), not
through ``Connection.recv``/``send``/``bio_read``, which allocate a buffer and copy each record
once more; with ``BufferedProtocol`` reads on the TLS side too (no 256 KiB ``bytes`` per read),
this halved the relay's CPU per GiB (``bench/proxy_relay.py``). The read buffers and the scratch
block are shared by every connection of a thread (:class:`Buffers`), not one per connection.
The scratch block is handed to the transport when it holds at least ``HANDOFF_MIN`` bytes (a
new block takes its place: a transport may keep what it was given queued); smaller outputs are
copied out, so queued small writes never pin large blocks.

Ends of stream: a close_notify, or a FIN (a truncation: logged, but forwarded like an end),
ends the TLS-to-plaintext direction once every record before it has been written: the plaintext
side then gets a FIN (``write_eof``). A FIN from the plaintext side makes the TLS side send
close_notify and then FIN: a real half-close, since we drive the TCP socket ourselves. When one
direction has ended, the other has ``close_timeout`` seconds to end as well; when both have, both
transports are closed after their buffers are flushed. ``idle_timeout`` closes a connection that
moved no byte in either direction for that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast

from OpenSSL import SSL

from sidecar.proxy.errors import HandshakeError
from sidecar.proxy.tls import PeerCheck, ffi, lib
from spiffecore import VerifiedX509SVID

READ_SIZE: Final = 256 * 1024
"""The read buffers (ciphertext, plaintext), and the most plaintext decrypted per batch."""
RECORD_SIZE: Final = 16 * 1024
"""The most plaintext one TLS record carries: what one ``SSL_read`` can return."""
FLUSH_SIZE: Final = READ_SIZE + 64 * 1024
"""The scratch block: the records of one full read buffer (16 KiB records and their overhead)."""
HANDOFF_MIN: Final = 64 * 1024
"""A scratch buffer holding at least this much is handed to a transport as it is (and replaced);
less is copied out into ``bytes``, so a queue of small writes never pins 320 KiB blocks each."""

_alloc: Final = ffi.new_allocator(should_clear_after_alloc=False)
ssl_get_error: Final = lib.SSL_get_error
SSL_ERROR_WANT_READ: Final[int] = lib.SSL_ERROR_WANT_READ
SSL_ERROR_ZERO_RETURN: Final[int] = lib.SSL_ERROR_ZERO_RETURN


class Buffers:
    """The memory every connection of one thread (one event loop) shares.

    - ``tls_in``: ciphertext; a TLS transport reads into it (``BufferedProtocol``) and
      ``buffer_updated`` writes it into the connection's BIO before returning.
    - ``plain_in``: plaintext; a plaintext transport reads into it and ``plain_data`` encrypts it
      (or, before the relay starts, copies it) before returning.
    - ``block``: uninitialised memory OpenSSL writes decrypted records, or records to send, into;
      filled and emptied (:meth:`take`) within one callback.

    Sharing is safe only because a loop runs every callback in its own thread, one at a time:
    hence one set per thread (:func:`buffers`), never one per process.
    """

    __slots__ = ("block", "plain_in", "tls_in", "tls_in_ptr")

    def __init__(self) -> None:
        tls_in = bytearray(READ_SIZE)
        self.tls_in = memoryview(tls_in)
        self.tls_in_ptr: Any = ffi.from_buffer(tls_in)
        self.plain_in = memoryview(bytearray(READ_SIZE))
        self.block: Any = _alloc("char[]", FLUSH_SIZE)

    def take(self, size: int) -> bytes | memoryview:
        """The block's first ``size`` bytes, for a transport's ``write``: handed over or copied (small)."""
        if size < HANDOFF_MIN:
            return ffi.unpack(self.block, size)  # type: ignore[no-any-return]
        view = memoryview(ffi.buffer(self.block, size))  # keeps the block alive while queued
        self.block = _alloc("char[]", FLUSH_SIZE)
        return view


_per_thread = threading.local()


def buffers() -> Buffers:
    """This thread's :class:`Buffers`."""
    try:
        return cast(Buffers, _per_thread.buffers)
    except AttributeError:
        _per_thread.buffers = mine = Buffers()
        return mine


_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Seconds; ``idle`` ``None`` means no idle timeout."""

    handshake: float = 10.0
    connect: float = 10.0
    idle: float | None = None
    close: float = 60.0

    def __post_init__(self) -> None:
        for name in ("handshake", "connect", "close"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} timeout must be positive, not {getattr(self, name)}")
        if self.idle is not None and self.idle <= 0:
            raise ValueError(f"idle timeout must be positive or None, not {self.idle}")


class TLSSide(asyncio.BufferedProtocol):
    """The TLS end of a connection: drives the handshake, then hands records to its :class:`Relay`.

    Ciphertext is read into the thread's shared buffer and written into the connection's BIO at once;
    records are decrypted and encrypted with ``SSL_read``/``SSL_write`` into and out of reused
    memory (pyOpenSSL's ``recv``/``bio_read`` would allocate and copy every record once more).
    """

    def __init__(self, conn: SSL.Connection, check: PeerCheck, *, handshake_timeout: float) -> None:
        self.conn = conn
        # pyOpenSSL internals (checked by tests/sidecar/proxy/test_relay_bytes.py): the SSL
        # object and its two memory BIOs.
        self.ssl: Any = conn._ssl
        self.bio_in: Any = conn._into_ssl
        self.bio_out: Any = conn._from_ssl
        self.buffers = buffers()  # created in the loop's thread, like every callback
        self.check = check
        self.transport: asyncio.Transport | None = None
        self.relay: Relay | None = None
        self.handshake: asyncio.Future[VerifiedX509SVID] = asyncio.get_running_loop().create_future()
        self.on_lost: Callable[[TLSSide], None] | None = None
        self.peer_fin = False
        self._handshake_timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self._timer = asyncio.get_running_loop().call_later(self._handshake_timeout, self._timed_out)
        self._do_handshake()  # a client sends its ClientHello; a server just waits for one

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffers.tls_in

    def buffer_updated(self, nbytes: int) -> None:
        if lib.BIO_write(self.bio_in, self.buffers.tls_in_ptr, nbytes) != nbytes:  # pragma: no cover - the BIO grows
            self._fail("tls: could not buffer records")
            return
        relay = self.relay
        if relay is not None:
            relay.tls_readable()
        elif not self.handshake.done():
            self._do_handshake()
        # Otherwise the handshake is done and the relay not started: the records wait in the BIO.

    def eof_received(self) -> bool:
        self.peer_fin = True
        relay = self.relay
        if relay is not None:
            relay.tls_readable()
            return True
        if not self.handshake.done():
            self._fail(self.check.error or "peer closed the connection during the handshake")
            return False
        return True  # the relay will see ``peer_fin`` when it starts

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeError(self.check.error or "connection lost during the handshake"))
        if self.relay is not None:
            self.relay.side_lost("tls", exc)
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.tls_pause_writing()

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.tls_resume_writing()

    # --- helpers -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Send every record OpenSSL has produced."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        bio_read = lib.BIO_read
        out = self.bio_out
        scratch = self.buffers
        while True:
            size = bio_read(out, scratch.block, FLUSH_SIZE)
            if size <= 0:  # empty
                return
            transport.write(scratch.take(size))
            if size < FLUSH_SIZE:
                return

    def raise_error(self, result: int) -> None:
        """Raise what OpenSSL's ``SSL_read``/``SSL_write`` returning ``result`` (<= 0) means."""
        self.conn._raise_ssl_error(self.ssl, result)
        raise SSL.WantReadError  # SSL_ERROR_NONE: nothing to read now

    def _do_handshake(self) -> None:
        # SSL_do_handshake itself: pyOpenSSL's do_handshake raises WantReadError for every flight
        # the peer has not sent yet (twice per connection). Failures still go through pyOpenSSL,
        # for its exception and OpenSSL's reasons.
        result = lib.SSL_do_handshake(self.ssl)
        if result <= 0:
            self.flush()  # the next flight, or the alert if OpenSSL made one
            if ssl_get_error(self.ssl, result) == SSL_ERROR_WANT_READ:
                return
            try:
                self.conn._raise_ssl_error(self.ssl, result)
            except SSL.Error as err:
                self._fail(self.check.error or f"tls: handshake failed ({_ssl_reason(err)})")
                return
            self._fail(self.check.error or "tls: handshake failed")  # pragma: no cover - OpenSSL said no error
            return
        self.flush()
        if self._timer is not None:
            self._timer.cancel()
        verified = self.check.verified
        if verified is None:  # fail closed: no verify callback ran at the leaf
            self._fail(self.check.reason())
            return
        assert self.transport is not None
        self.transport.pause_reading()  # until the relay starts; records wait in the kernel and the BIO
        self.handshake.set_result(verified)

    def _fail(self, reason: str) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeError(reason))
        if self.transport is not None:
            self.transport.close()  # flushes the alert, then closes

    def _timed_out(self) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeError(f"handshake timed out after {self._handshake_timeout:g} s"))
            if self.transport is not None:
                self.transport.abort()


class PlainSide(asyncio.BufferedProtocol):
    """The plaintext end of a connection: reads into the relay's buffer."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.relay.plain = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.relay.plain.pause_reading()  # until the relay starts

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.relay.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.relay.plain_data(nbytes)

    def eof_received(self) -> bool:
        self.relay.plain_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.side_lost("plain", exc)

    def pause_writing(self) -> None:
        self.relay.plain_pause_writing()

    def resume_writing(self) -> None:
        self.relay.plain_resume_writing()


class Relay:
    """Copies bytes between a :class:`TLSSide` and a plaintext transport (set by :class:`PlainSide`).

    ``from_tls`` counts bytes from TLS to plaintext, ``to_tls`` from plaintext to TLS (both
    plaintext bytes). ``on_done`` is called once, when both transports are gone.
    """

    __slots__ = (
        "_active",
        "_close_timer",
        "_closed",
        "_early",
        "_early_eof",
        "_idle_timer",
        "_lost",
        "_plain_paused",
        "buffer",
        "down_done",
        "from_tls",
        "label",
        "on_done",
        "plain",
        "timeouts",
        "tls",
        "to_tls",
        "up_done",
    )

    def __init__(self, *, timeouts: Timeouts, label: str = "", on_done: Callable[[Relay], None] | None = None) -> None:
        self.timeouts = timeouts
        self.label = label
        self.on_done = on_done
        self.tls: TLSSide | None = None
        self.plain: asyncio.Transport | None = None
        self.buffer = buffers().plain_in  # shared by the thread: emptied by plain_data before the next read
        self.from_tls = 0
        self.to_tls = 0
        self.down_done = False
        self.up_done = False
        self._plain_paused = False  # the plaintext transport's write buffer is full
        self._active = False
        self._closed = False
        self._lost: set[str] = set()
        self._early: list[bytes] = []  # plaintext read before start() (uvloop reads despite pause_reading)
        self._early_eof = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    def start(self, tls: TLSSide) -> None:
        """Begin copying: both sides are connected and the handshake has been verified."""
        assert self.plain is not None
        assert tls.transport is not None
        self.tls = tls
        tls.relay = self
        if self.timeouts.idle is not None:
            self._idle_timer = asyncio.get_running_loop().call_later(self.timeouts.idle, self._idle_check)
        tls.transport.resume_reading()
        self.plain.resume_reading()
        self.tls_readable()  # records that arrived with the handshake's last flight
        early, self._early = self._early, []
        for data in early:
            self._encrypt(data)
        if self._early_eof:
            self.plain_eof()

    # --- TLS to plaintext --------------------------------------------------------------------

    def tls_readable(self) -> None:
        tls = self.tls
        plain = self.plain
        if tls is None or plain is None or self.down_done or self._plain_paused or self._closed:
            return
        ssl = tls.ssl
        ssl_read = lib.SSL_read
        scratch = tls.buffers
        block = scratch.block
        size = 0
        ended = False
        result = 1
        while size < READ_SIZE:
            result = ssl_read(ssl, block + size, READ_SIZE - size)  # at most one record
            if result <= 0:
                break
            size += result
        if result <= 0:
            # The two outcomes of every read are told apart without pyOpenSSL raising an exception
            # (a few µs each time, on every 64-byte request too); anything else goes through it.
            error = ssl_get_error(ssl, result)
            if error == SSL_ERROR_ZERO_RETURN:  # close_notify
                ended = True
            elif error == SSL_ERROR_WANT_READ or self._nothing_to_read(tls, result):
                ended = tls.peer_fin
                if ended:
                    _log.info("peer closed without close_notify (truncation)", extra={"connection": self.label})
            else:
                return  # aborted
        if size:
            self.from_tls += size
            self._active = True
            plain.write(scratch.take(size))  # may call plain_pause_writing
        tls.flush()  # answers to post-handshake messages, if any
        if ended:
            self.down_done = True
            if plain.can_write_eof():
                plain.write_eof()
            self._direction_done()
        elif size >= READ_SIZE and not self._plain_paused:
            asyncio.get_running_loop().call_soon(self.tls_readable)  # more may be in the BIO

    def _nothing_to_read(self, tls: TLSSide, result: int) -> bool:
        """True when ``SSL_read`` returning ``result`` only means "no record yet"; otherwise the
        connection is aborted with OpenSSL's reason and False returned."""
        try:
            tls.raise_error(result)
        except SSL.WantReadError:
            return True
        except SSL.Error as err:
            self.abort(f"tls: {_ssl_reason(err)}")
        return False

    def plain_pause_writing(self) -> None:
        self._plain_paused = True
        if self.tls is not None and self.tls.transport is not None:
            self.tls.transport.pause_reading()

    def plain_resume_writing(self) -> None:
        self._plain_paused = False
        if self.tls is not None and self.tls.transport is not None and not self._closed:
            self.tls.transport.resume_reading()
            self.tls_readable()

    # --- plaintext to TLS --------------------------------------------------------------------

    def plain_data(self, nbytes: int) -> None:
        if self.tls is None:
            # uvloop starts reading after connection_made even if it paused reading: keep the
            # bytes for start() and pause again.
            self._early.append(bytes(self.buffer[:nbytes]))
            if self.plain is not None:
                self.plain.pause_reading()
            return
        self._encrypt(self.buffer[:nbytes])

    def _encrypt(self, view: memoryview | bytes) -> None:
        tls = self.tls
        assert tls is not None
        ssl = tls.ssl
        ssl_write = lib.SSL_write
        nbytes = len(view)
        done = 0
        with ffi.from_buffer(view) as data:
            # pyOpenSSL turns on partial writes: SSL_write takes one record at a time.
            while done < nbytes:
                result = ssl_write(ssl, data + done, nbytes - done)
                if result <= 0:
                    try:
                        tls.raise_error(result)
                    except SSL.Error as err:
                        self.abort(f"tls: {_ssl_reason(err)}")
                        return
                done += result
        self.to_tls += nbytes
        self._active = True
        tls.flush()

    def plain_eof(self) -> None:
        tls = self.tls
        if tls is None:
            self._early_eof = True
            return
        if self.up_done:
            return
        self.up_done = True
        with contextlib.suppress(SSL.Error):  # a broken TLS side is closed below anyway
            tls.conn.shutdown()  # close_notify
        tls.flush()
        if tls.transport is not None and not tls.transport.is_closing():
            tls.transport.write_eof()
        self._direction_done()

    def tls_pause_writing(self) -> None:
        if self.plain is not None:
            self.plain.pause_reading()

    def tls_resume_writing(self) -> None:
        if self.plain is not None and not self._closed and not self.up_done:
            self.plain.resume_reading()

    # --- ends --------------------------------------------------------------------------------

    def _direction_done(self) -> None:
        if self.down_done and self.up_done:
            self.close()
        elif self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(self.timeouts.close, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self.abort(f"the other direction did not end within the close timeout ({self.timeouts.close:g} s)")

    def _idle_check(self) -> None:
        if self._closed:
            return
        if not self._active:
            self.abort(f"idle for {self.timeouts.idle:g} s")
            return
        self._active = False
        assert self.timeouts.idle is not None
        self._idle_timer = asyncio.get_running_loop().call_later(self.timeouts.idle, self._idle_check)

    def close(self) -> None:
        """Close both sides after their buffers are flushed."""
        if self._closed:
            return
        self._closed = True
        self._cancel_timers()
        for transport in self._transports():
            transport.close()

    def abort(self, reason: str) -> None:
        """Drop both sides at once."""
        if self._closed:
            return
        _log.info("connection aborted", extra={"connection": self.label, "reason": reason})
        self._closed = True
        self._cancel_timers()
        for transport in self._transports():
            transport.abort()

    def side_lost(self, side: str, exc: Exception | None) -> None:
        self._lost.add(side)
        if not self._closed:
            # One side is gone: let the other flush what it has, then close.
            self.close()
        if len(self._lost) == 2 or (side == "plain" and self.tls is None):
            self._cancel_timers()
            if self.tls is not None:
                _log.info(
                    "connection closed",
                    extra={"connection": self.label, "bytes_from_tls": self.from_tls, "bytes_to_tls": self.to_tls},
                )
            on_done, self.on_done = self.on_done, None
            if on_done is not None:
                on_done(self)

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._close_timer):
            if timer is not None:
                timer.cancel()

    def _transports(self) -> list[asyncio.Transport]:
        transports = [self.plain] if self.plain is not None else []
        if self.tls is not None and self.tls.transport is not None:
            transports.append(self.tls.transport)
        return transports


def _ssl_reason(err: SSL.Error) -> str:
    try:
        return "; ".join(str(part[2]) for part in err.args[0]) or str(err)
    except (IndexError, TypeError):
        return str(err)
