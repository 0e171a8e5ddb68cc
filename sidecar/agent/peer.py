"""The agent's public unix socket (the "front door"): who is calling, by the kernel's word.

grpcio cannot tell who calls over a unix socket (``context.peer()`` is ``"unix:"``). So the agent
owns its public socket: for each connection the front door reads ``SO_PEERCRED`` (pid, uid, gid)
and the caller's start time from ``/proc/<pid>/stat``, connects to the private grpc.aio server
from a socket bound to a fresh, random abstract address, and relays bytes both ways. grpcio
reports that address as the peer of every call on the connection (``unix-abstract:<name>``),
and :meth:`FrontDoor.caller_for` maps it back to the :class:`Caller`.

Fail closed: the private server's abstract address can be found in ``/proc/net/unix`` and
anyone on the host may connect to it directly, so a peer that is not in the map is a stranger
and the servicer must refuse it. A name is mapped only once the front door holds it (the
kernel refuses to bind a name twice) and is unmapped before the front door's socket releases
it, so a stranger can never connect under a mapped name. Names are never reused.

The relay moves bytes with ``asyncio.BufferedProtocol``: the kernel reads straight into one
buffer shared by every connection (the loop runs one callback at a time, and each read is
handed to the other side before the next), which is written to the other side at once, so an
idle connection costs no buffer at all. Backpressure: when one side's outgoing buffer passes its
high-water mark, reading from the other side pauses until it drains. A half-close (EOF) is
passed on as a half-close; when one side is lost the other is closed once its pending data is
written, or aborted after ``close_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import stat
import struct
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self, cast
from urllib.parse import unquote

from sidecar.agent.attestors.base import PROC_ROOT, Caller, WorkloadAttestationError, read_stat
from spiffecore import SpiffeError

log = logging.getLogger(__name__)

ABSTRACT_SCHEME: Final = "unix-abstract:"
DEFAULT_MAX_CONNECTIONS: Final = 10_000
DEFAULT_BUFFER_SIZE: Final = 256 * 1024
DEFAULT_CLOSE_TIMEOUT: Final = 10.0
DEFAULT_BACKLOG: Final = 4096
SOCKET_MODE: Final = 0o777  # any local process may connect: the Workload API authenticates by attestation
DIRECTORY_MODE: Final = 0o755

_UCRED: Final = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_PEER_NAME_PREFIX: Final = "spiffe-peer-"
_BIND_ATTEMPTS: Final = 3
_CONNECT_DELAYS: Final = (0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 1.0, 1.0)  # backend backlog full: ~4 s
_LOG_INTERVAL: Final = 10.0


class HasPeer(Protocol):
    """What the front door needs of a gRPC servicer context."""

    def peer(self) -> str: ...


class FrontDoorError(SpiffeError):
    """The front door cannot start (bad address, a socket path in use, ...)."""

    layer = "frontdoor"


def grpc_backend_address(prefix: str = "spiffe-agent") -> str:
    """A fresh, random abstract address for the private gRPC server (``unix-abstract:<name>``)."""
    return f"{ABSTRACT_SCHEME}{prefix}-{secrets.token_hex(12)}"


def socket_address(address: str) -> str | bytes:
    """The ``connect()`` address of a gRPC unix target: ``unix-abstract:<name>``, ``unix:<path>``
    or ``unix:///<absolute path>``."""
    if address.startswith(ABSTRACT_SCHEME):
        name = address.removeprefix(ABSTRACT_SCHEME)
        if not name:
            raise FrontDoorError("abstract address has no name", address)
        return b"\0" + name.encode()
    if address.startswith("unix://"):
        path = address.removeprefix("unix://")
        if not path.startswith("/"):
            raise FrontDoorError("unix:// address must have an absolute path and no authority", address)
        return path
    if address.startswith("unix:") and len(address) > len("unix:"):
        return address.removeprefix("unix:")
    raise FrontDoorError("backend address must be unix-abstract:<name> or unix:<path>", address)


def peer_name(peer: str) -> str | None:
    """The abstract name in a gRPC peer string, or ``None`` if it is not an abstract address.

    grpcio 1.85 reports ``unix-abstract:<name>``, percent-encoding bytes such as NUL
    (``unix-abstract:%00x`` for a name starting with NUL). A leading NUL or ``@`` (how ``ss``
    and Go write the abstract marker) is not part of the name.
    """
    if not peer.startswith(ABSTRACT_SCHEME):
        return None
    # A stranger may bind any bytes as its name; undecodable ones cannot match ours (ASCII).
    name = unquote(peer.removeprefix(ABSTRACT_SCHEME), errors="replace")
    if name.startswith(("\0", "@")):
        name = name[1:]
    return name or None


class FrontDoor:
    """The agent's public socket, relaying each attested connection to the private gRPC server.

    ``backend_address`` is the private server's gRPC address (:func:`grpc_backend_address`; a
    ``unix:<path>`` in a private directory works too). Use as an async context manager, or call
    :meth:`start` and :meth:`close`. Connections beyond ``max_connections`` are closed at once.
    """

    def __init__(
        self,
        public_path: Path | str,
        backend_address: str,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        backlog: int = DEFAULT_BACKLOG,
        proc_root: Path = PROC_ROOT,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        if buffer_size < 4096:
            raise ValueError(f"buffer_size must be at least 4096, not {buffer_size}")
        self._path = Path(public_path)
        self._backend_address = backend_address
        self._backend = socket_address(backend_address)
        self._max_connections = max_connections
        self._buffer_size = buffer_size
        self._close_timeout = close_timeout
        self._backlog = backlog
        self._proc_root = proc_root
        self._buffer = bytearray(0)
        self._view = memoryview(self._buffer)
        self._callers: dict[str, Caller] = {}
        self._connections: set[_Connection] = set()
        self._setups: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._socket_id: tuple[int, int] | None = None
        self._closed = False
        self._last_log: dict[str, float] = {}
        self.refused = 0
        """Connections closed at once because ``max_connections`` were open."""

    @property
    def path(self) -> Path:
        return self._path

    @property
    def backend_address(self) -> str:
        return self._backend_address

    @property
    def connections(self) -> int:
        """Connections open now (accepted and not yet closed on both sides)."""
        return len(self._connections)

    def caller_for(self, peer: str) -> Caller | None:
        """The caller behind a gRPC call's ``context.peer()``, or ``None`` for a stranger.

        ``None`` means the call did not come through the front door (or its connection has
        closed): refuse it.
        """
        name = peer_name(peer)
        return None if name is None else self._callers.get(name)

    def caller_of(self, context: HasPeer) -> Caller | None:
        """:meth:`caller_for` a gRPC call's context (``grpc.aio.ServicerContext``)."""
        return self.caller_for(context.peer())

    async def start(self) -> None:
        """Listen on the public socket; the parent directory is created (0755) if missing."""
        if self._server is not None or self._closed:
            raise FrontDoorError("front door was already started", str(self._path))
        self._new_buffer()
        sock = self._listen()
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                self._new_client_side, sock=sock, backlog=self._backlog
            )
        except BaseException:
            sock.close()
            self._unlink()
            raise

    async def close(self) -> None:
        """Stop accepting, close every relayed connection and remove the socket file."""
        if self._closed:
            return
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in self._setups:
            task.cancel()
        for connection in list(self._connections):
            connection.abort()
        if self._setups:
            await asyncio.gather(*self._setups, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        self._unlink()
        # Aborted transports report connection_lost on the next loop iterations.
        for _ in range(10):
            if not self._connections:
                break
            await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- the public socket ----------------------------------------------------------------------

    def _listen(self) -> socket.socket:
        path = self._path
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(DIRECTORY_MODE)
        try:
            existing = path.lstat()
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(existing.st_mode):
                raise FrontDoorError("socket path exists and is not a socket", str(path))
            if _is_listening(path):
                raise FrontDoorError("another process is listening on the socket path", str(path))
            path.unlink()  # a stale socket left by a previous agent
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(path))
            path.chmod(SOCKET_MODE)
            created = path.lstat()
            self._socket_id = (created.st_dev, created.st_ino)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            self._unlink()
            raise FrontDoorError(f"cannot listen on the socket path: {err.strerror}", str(path)) from err
        return sock

    def _unlink(self) -> None:
        """Remove the socket file, if it is still the one this front door created."""
        if self._socket_id is None:
            return
        with contextlib.suppress(FileNotFoundError):
            current = self._path.lstat()
            if (current.st_dev, current.st_ino) == self._socket_id:
                self._path.unlink()
        self._socket_id = None

    # --- connections ----------------------------------------------------------------------------

    def _new_client_side(self) -> _Side:
        return _Connection(self).client

    def _new_buffer(self) -> None:
        self._buffer = bytearray(self._buffer_size)
        self._view = memoryview(self._buffer)

    def _accepted(self, connection: _Connection, transport: asyncio.Transport) -> None:
        if len(self._connections) >= self._max_connections or self._closed:
            self.refused += 1
            self._log_limited(
                "refused", "front door: connection refused: too many connections", max_connections=self._max_connections
            )
            transport.abort()
            return
        caller = self._read_caller(transport)
        if caller is None:
            transport.abort()
            return
        connection.caller = caller
        transport.pause_reading()  # until the backend is connected
        self._connections.add(connection)
        task = asyncio.get_running_loop().create_task(self._connect_backend(connection))
        self._setups.add(task)
        task.add_done_callback(self._setups.discard)

    def _read_caller(self, transport: asyncio.Transport) -> Caller | None:
        sock = cast(socket.socket, transport.get_extra_info("socket"))
        try:
            pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError as err:
            log.debug("front door: connection dropped: no peer credentials", extra={"error": str(err)})
            return None
        if pid <= 0:  # the caller's pid namespace is not a descendant of ours: it cannot be attested
            log.debug("front door: connection dropped: caller has no pid here", extra={"uid": uid})
            return None
        try:
            start_time = self._start_time(pid)
        except WorkloadAttestationError as err:
            log.debug("front door: connection dropped: caller is gone", extra={"pid": pid, "error": str(err)})
            return None
        return Caller(pid=pid, uid=uid, gid=gid, start_time=start_time)

    def _start_time(self, pid: int) -> int:
        # Through the open /proc/<pid> directory, as the attestor reads: plain os calls cost half
        # of a pathlib read, and this runs for every connection.
        try:
            dir_fd = os.open(f"{self._proc_root}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise WorkloadAttestationError(f"cannot open the /proc directory of process {pid}: {err.strerror}") from err
        try:
            return read_stat(pid, dir_fd=dir_fd).start_time
        finally:
            os.close(dir_fd)

    async def _connect_backend(self, connection: _Connection) -> None:
        try:
            sock, name = await self._backend_socket()
        except OSError as err:
            self._log_limited(
                "backend",
                "front door: cannot reach the private gRPC server",
                address=self._backend_address,
                error=str(err),
            )
            connection.abort()
            return
        caller = connection.caller
        assert caller is not None
        if connection.client.lost:
            sock.close()  # the caller left while the backend was being reached
            return
        # Mapped while this socket holds the name; _Connection.unregister runs before it is closed.
        self._callers[name] = caller
        connection.name = name
        try:
            await asyncio.get_running_loop().create_unix_connection(lambda: connection.backend, sock=sock)
        except BaseException:
            connection.unregister()
            sock.close()
            connection.abort()
            raise
        connection.linked()

    async def _backend_socket(self) -> tuple[socket.socket, str]:
        for attempt in range(_BIND_ATTEMPTS):
            name = _PEER_NAME_PREFIX + secrets.token_hex(8)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            try:
                sock.bind(b"\0" + name.encode())
            except OSError:
                sock.close()
                if attempt + 1 == _BIND_ATTEMPTS:
                    raise
                continue
            try:
                await self._connect(sock)
            except BaseException:
                sock.close()
                raise
            return sock, name
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connect(self, sock: socket.socket) -> None:
        # A non-blocking unix connect completes at once, or fails with EAGAIN while the server's
        # accept backlog is full: retry for a few seconds (loop.sock_connect would wait for
        # writability, which an unconnected unix socket always has).
        for delay in _CONNECT_DELAYS:
            try:
                sock.connect(self._backend)
            except BlockingIOError:
                await asyncio.sleep(delay)
            else:
                return
        sock.connect(self._backend)

    def _forget(self, connection: _Connection) -> None:
        self._connections.discard(connection)

    def _log_limited(self, key: str, message: str, **extra: object) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._last_log.get(key, -_LOG_INTERVAL) >= _LOG_INTERVAL:
            self._last_log[key] = now
            log.warning(message, extra=extra)


def _is_listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except BlockingIOError:
        return True  # its backlog is full: it is alive
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    else:
        return True
    finally:
        probe.close()


class _Connection:
    """One relayed connection: the caller's socket, the socket to the backend, the mapped name."""

    __slots__ = ("_abort_timer", "backend", "caller", "client", "door", "name")

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.caller: Caller | None = None
        self.name: str | None = None
        self.client = _Side(self)
        self.backend = _Side(self)
        self.client.peer = self.backend
        self.backend.peer = self.client
        self._abort_timer: asyncio.TimerHandle | None = None

    def linked(self) -> None:
        """Both sides are connected: start relaying (unless the caller left meanwhile)."""
        if self.client.transport is None or self.client.lost:
            self.backend.close()
            return
        self.client.transport.resume_reading()

    def unregister(self) -> None:
        if self.name is not None:
            self.door._callers.pop(self.name, None)

    def side_lost(self, side: _Side) -> None:
        self.unregister()
        other = side.peer
        if other.transport is not None and not other.lost:
            other.close()
            if self._abort_timer is None:
                self._abort_timer = asyncio.get_running_loop().call_later(self.door._close_timeout, self.abort)
            return
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        self.door._forget(self)

    def abort(self) -> None:
        self.unregister()
        for side in (self.client, self.backend):
            if side.transport is not None and not side.lost:
                side.transport.abort()
        if self.backend.transport is None and (self.client.lost or self.client.transport is None):
            self.door._forget(self)  # no backend yet, and the client side is already gone


class _Side(asyncio.BufferedProtocol):
    """One socket of a relayed connection: what it reads is written to the other side."""

    __slots__ = ("connection", "eof", "lost", "peer", "transport")

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.transport: asyncio.Transport | None = None
        self.peer: _Side = self
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self is self.connection.client:
            self.connection.door._accepted(self.connection, self.transport)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.connection.door._buffer

    def buffer_updated(self, nbytes: int) -> None:
        out = self.peer.transport
        if out is None or out.is_closing():
            return  # the other side is gone: nobody to deliver to
        door = self.connection.door
        out.write(door._view[:nbytes])
        if out.get_write_buffer_size():
            # Not all of it was sent: the transport may keep a view of the shared buffer (Python
            # 3.12+ and uvloop do), so the next read must go into a fresh one.
            door._new_buffer()

    def eof_received(self) -> bool:
        self.eof = True
        out = self.peer.transport
        if out is None or out.is_closing():
            return False
        if self.peer.eof or not out.can_write_eof():
            out.close()  # both directions are done: close once the pending data is written
            return False
        out.write_eof()
        return True  # keep this side open: the other direction may still carry data

    def pause_writing(self) -> None:
        reader = self.peer.transport
        if reader is not None and not reader.is_closing():
            reader.pause_reading()

    def resume_writing(self) -> None:
        reader = self.peer.transport
        if reader is not None and not reader.is_closing():
            reader.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost or self.transport is None:
            return
        self.lost = True
        if self.connection.caller is None:
            return  # refused at accept: never counted
        self.connection.side_lost(self)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
