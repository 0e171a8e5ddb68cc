"""The agent's front door with real parts: unix sockets, a grpc.aio server behind it, and clients
that are separate processes, some running as other users.

The gRPC clients are this venv's Python in a subprocess; a client that must run as another user
imports grpc as root and then drops its ids (``setgroups``, ``setgid``, ``setuid``) before it
connects, because this interpreter lives under ``/root``, which other users cannot enter. Raw-socket
clients that need no grpc run the system Python started directly as another user
(``user=``/``group=``/``extra_groups=``). Byte-level relay tests put a plain asyncio server behind
the front door instead of gRPC.

Nothing here depends on the event loop's implementation: to run these tests on uvloop too, add
it to a ``pytest_asyncio_loop_factories`` hook in a conftest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import grpc
import pytest

from sidecar.agent.attestors.base import Caller, WorkloadAttestationError
from sidecar.agent.attestors.unix import UnixAttestor, UnixAttestorConfig
from sidecar.agent.peer import FrontDoor, FrontDoorError, grpc_backend_address, peer_name, socket_address

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="running clients as other users needs root")

SYSTEM_PYTHON: Final = Path("/usr/bin/python3")
PEER_RE: Final = re.compile(r"unix-abstract:spiffe-peer-[0-9a-f]{16}")
UNNAMED_GID: Final = 4242
MiB: Final = 1 << 20
WAIT: Final = 20.0

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Context = grpc.aio.ServicerContext[bytes, bytes]

# --- client programs (separate processes) -------------------------------------------------------

GRPC_CLIENT: Final = textwrap.dedent(
    """
    import json, os, sys
    import grpc
    from grpc import _channel  # imported lazily by grpc, and this interpreter is unreadable once ids drop

    target, drop = sys.argv[1], json.loads(sys.argv[2])
    if drop:
        os.setgroups(drop["groups"])
        os.setgid(drop["gid"])
        os.setuid(drop["uid"])
    stat = open("/proc/self/stat", "rb").read()
    start_time = int(stat[stat.rindex(b")") + 1 :].split()[19])
    with grpc.insecure_channel(target) as channel:
        try:
            result = {"reply": json.loads(channel.unary_unary("/test.Who/Whoami")(b"", timeout=30))}
        except grpc.RpcError as err:
            result = {"code": err.code().name, "details": err.details()}
    print(json.dumps({"pid": os.getpid(), "uid": os.getuid(), "start_time": start_time, **result}))
    """
)

CONCURRENT_CLIENT: Final = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import grpc

    async def main(target, n):
        # A local subchannel pool per channel: n channels are n connections.
        channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(n)
        ]
        replies = await asyncio.gather(*(c.unary_unary("/test.Who/Whoami")(b"", timeout=60) for c in channels))
        replies = [json.loads(r) for r in replies]
        for channel in channels:
            await channel.close()
        print(json.dumps({"pid": os.getpid(), "pids": sorted({r["pid"] for r in replies}),
                          "peers": len({r["peer"] for r in replies})}))

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)

FIRE_AND_EXIT: Final = textwrap.dedent(
    """
    import os, sys
    import grpc

    channel = grpc.insecure_channel(sys.argv[1])
    grpc.channel_ready_future(channel).result(timeout=30)
    channel.unary_unary("/test.Who/Whoami").future(b"", timeout=30)
    print("{}", flush=True)
    os._exit(0)
    """
)

RAW_HOLD: Final = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(b"hello\\n")
    print(s.recv(65536).decode().strip(), flush=True)
    sys.stdin.read()
    """
)


async def run_client(script: str, *args: str, python: str = sys.executable, **options: Any) -> dict[str, Any]:
    """Run a client program to completion (without blocking the loop the agent runs on)."""
    process = await asyncio.create_subprocess_exec(
        python, "-c", script, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **options
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout)
    return result


# --- the agent under test: a front door and a gRPC server behind it ------------------------------


@dataclasses.dataclass
class Agent:
    door: FrontDoor
    outcomes: list[str] = dataclasses.field(default_factory=list)

    @property
    def target(self) -> str:
        return f"unix:{self.door.path}"


@asynccontextmanager
async def running_agent(
    public: Path, *, attestor: UnixAttestor | None = None, **door_options: Any
) -> AsyncIterator[Agent]:
    """A grpc.aio server on a private abstract address, with a trivial servicer that names its
    caller, behind a front door on ``public``."""
    backend = grpc_backend_address("spiffe-agent-test")
    door = FrontDoor(public, backend, **door_options)
    agent = Agent(door)
    attest = attestor or UnixAttestor()

    async def whoami(request: bytes, context: Context) -> bytes:
        peer = context.peer()
        caller = door.caller_of(context)
        if caller is None:
            agent.outcomes.append(f"stranger {peer}")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"not called through the front door: {peer}")
        try:
            selectors = await attest.attest(caller)
        except WorkloadAttestationError as err:
            agent.outcomes.append(str(err))
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        agent.outcomes.append("ok")
        reply = {**dataclasses.asdict(caller), "peer": peer, "selectors": sorted(selectors)}
        return json.dumps(reply).encode()

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("test.Who", {"Whoami": grpc.unary_unary_rpc_method_handler(whoami)})
    server.add_generic_rpc_handlers((handler,))
    assert server.add_insecure_port(backend) == 1
    await server.start()
    try:
        async with door:
            yield agent
    finally:
        await server.stop(None)


@asynccontextmanager
async def raw_backend(handler: Handler) -> AsyncIterator[str]:
    """A plain asyncio server on a fresh abstract address (its gRPC-style address is yielded)."""
    address = grpc_backend_address("raw-backend-test")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(socket_address(address))
    server = await asyncio.start_unix_server(handler, sock=sock)
    try:
        yield address
    finally:
        server.close()
        await server.wait_closed()


def backend_peer(writer: asyncio.StreamWriter) -> str:
    """The gRPC-style peer string of a connection the raw backend accepted (abstract name, with
    its leading NUL, as Python reports it)."""
    name = writer.get_extra_info("peername")
    return "unix-abstract:" + (name.decode() if isinstance(name, bytes) else name)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def eventually(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Whether the other end closes the connection (EOF, or a reset when our bytes were unread)."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is under a 0700 directory)."""
    directory = Path(tempfile.mkdtemp(prefix="frontdoor-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def public(socket_dir: Path) -> Path:
    return socket_dir / "agent" / "public.sock"


def _names() -> tuple[pwd.struct_passwd, grp.struct_group, grp.struct_group]:
    try:
        return pwd.getpwnam("nobody"), grp.getgrnam("nogroup"), grp.getgrnam("users")
    except KeyError:
        pytest.skip("the test machine has no nobody user, nogroup group or users group")


# --- gRPC through the front door ----------------------------------------------------------------


async def test_grpc_sees_the_caller_of_a_separate_process(public: Path) -> None:
    async with running_agent(public) as agent:
        result = await run_client(GRPC_CLIENT, agent.target, "null")
        reply = result["reply"]
        assert PEER_RE.fullmatch(reply["peer"]), reply["peer"]
        assert (reply["pid"], reply["uid"], reply["gid"]) == (result["pid"], os.geteuid(), os.getegid())
        assert reply["start_time"] == result["start_time"]
        assert agent.outcomes == ["ok"]
        await eventually(lambda: agent.door.connections == 0, "the relay closes with the client")
        assert agent.door.caller_for(reply["peer"]) is None


@root_only
async def test_grpc_caller_running_as_another_user(public: Path) -> None:
    nobody, nogroup, users = _names()
    drop = {"uid": nobody.pw_uid, "gid": nogroup.gr_gid, "groups": [users.gr_gid, UNNAMED_GID]}
    async with running_agent(public) as agent:
        result = await run_client(GRPC_CLIENT, agent.target, json.dumps(drop))
    reply = result["reply"]
    assert (reply["pid"], reply["uid"], reply["gid"]) == (result["pid"], nobody.pw_uid, nogroup.gr_gid)
    assert reply["selectors"] == sorted(
        [
            f"unix:uid:{nobody.pw_uid}",
            "unix:user:nobody",
            f"unix:gid:{nogroup.gr_gid}",
            "unix:group:nogroup",
            f"unix:supplementary_gid:{users.gr_gid}",
            "unix:supplementary_group:users",
            f"unix:supplementary_gid:{UNNAMED_GID}",
        ]
    )


async def test_a_stranger_connecting_to_the_private_server_is_refused(public: Path) -> None:
    # The private abstract address is visible in /proc/net/unix: connecting there directly must
    # not be mistaken for a caller of the front door.
    async with running_agent(public) as agent:
        result = await run_client(GRPC_CLIENT, agent.door.backend_address, "null")
        assert result["code"] == "PERMISSION_DENIED"
        assert result["details"].startswith("not called through the front door: ")
        assert agent.outcomes == [f"stranger {result['details'].rsplit(': ', 1)[1]}"]
        assert agent.door.connections == 0


async def test_many_concurrent_grpc_clients_each_see_their_own_pid(public: Path) -> None:
    processes, channels = 8, 25
    async with running_agent(public) as agent:
        results = await asyncio.gather(
            *(run_client(CONCURRENT_CLIENT, agent.target, str(channels)) for _ in range(processes))
        )
        for result in results:
            assert result["pids"] == [result["pid"]]
            assert result["peers"] == channels  # one abstract name per connection
        assert agent.outcomes == ["ok"] * processes * channels
        await eventually(lambda: agent.door.connections == 0, "every relay closes")


async def test_clients_exiting_right_after_calling_leave_the_agent_unharmed(public: Path) -> None:
    async with running_agent(public) as agent:
        await asyncio.gather(*(run_client(FIRE_AND_EXIT, agent.target) for _ in range(5)))
        await eventually(lambda: agent.door.connections == 0, "the relays of exited clients close")
        exited = re.compile(r"workload: process \d+ has exited|stranger unix-abstract:spiffe-peer-[0-9a-f]{16}|ok")
        assert all(exited.fullmatch(outcome) for outcome in agent.outcomes), agent.outcomes
        result = await run_client(GRPC_CLIENT, agent.target, "null")
        assert result["reply"]["pid"] == result["pid"]


async def test_garbage_instead_of_http2_is_dropped_and_others_are_served(public: Path) -> None:
    async with running_agent(public) as agent:
        reader, writer = await asyncio.open_unix_connection(public)
        writer.write(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n" + bytes(range(256)) * 64)
        served = asyncio.create_task(run_client(GRPC_CLIENT, agent.target, "null"))
        async with asyncio.timeout(WAIT):
            while await reader.read(65536):
                pass  # gRPC answers with its SETTINGS and a GOAWAY, then closes
        writer.close()
        result = await served
        assert result["reply"]["pid"] == result["pid"]
        await eventually(lambda: agent.door.connections == 0, "the garbage connection is closed")
        result = await run_client(GRPC_CLIENT, agent.target, "null")
        assert result["reply"]["pid"] == result["pid"]


# --- callers of a raw backend ---------------------------------------------------------------------


class Recorder:
    """A raw backend that answers each connection's first line with its caller's selectors."""

    def __init__(self, attestor: UnixAttestor) -> None:
        self.door: FrontDoor | None = None
        self.attestor = attestor
        self.callers: asyncio.Queue[tuple[str, Caller]] = asyncio.Queue()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.door is not None
        peer = backend_peer(writer)
        caller = self.door.caller_for(peer)
        assert caller is not None, peer
        await reader.readline()
        self.callers.put_nowait((peer, caller))
        selectors = await self.attestor.attest(caller)
        writer.write(json.dumps(sorted(selectors)).encode() + b"\n")
        await writer.drain()
        await reader.read()
        writer.close()


@root_only
async def test_raw_client_started_as_another_user_with_its_executable(public: Path) -> None:
    nobody, nogroup, users = _names()
    executable = SYSTEM_PYTHON.resolve()
    recorder = Recorder(UnixAttestor(UnixAttestorConfig(discover_workload_path=True)))
    async with raw_backend(recorder) as backend, FrontDoor(public, backend) as door:
        recorder.door = door
        process = await asyncio.create_subprocess_exec(
            executable,
            "-c",
            RAW_HOLD,
            str(public),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            user=nobody.pw_uid,
            group=nogroup.gr_gid,
            extra_groups=[users.gr_gid, UNNAMED_GID],
        )
        assert process.stdout is not None
        assert process.stdin is not None
        line = await asyncio.wait_for(process.stdout.readline(), WAIT)
        peer, caller = recorder.callers.get_nowait()
        assert (caller.pid, caller.uid, caller.gid) == (process.pid, nobody.pw_uid, nogroup.gr_gid)
        assert door.caller_for(peer) == caller
        process.stdin.close()
        assert await process.wait() == 0
        await eventually(lambda: door.connections == 0, "the relay closes when the client exits")
        assert door.caller_for(peer) is None
    assert json.loads(line) == sorted(
        [
            f"unix:uid:{nobody.pw_uid}",
            "unix:user:nobody",
            f"unix:gid:{nogroup.gr_gid}",
            "unix:group:nogroup",
            f"unix:supplementary_gid:{users.gr_gid}",
            "unix:supplementary_group:users",
            f"unix:supplementary_gid:{UNNAMED_GID}",
            f"unix:path:{executable}",
            f"unix:sha256:{hashlib.sha256(executable.read_bytes()).hexdigest()}",
        ]
    )


async def test_caller_that_exited_fails_attestation_and_a_reused_pid_is_caught(public: Path) -> None:
    attestor = UnixAttestor()
    recorder = Recorder(attestor)
    async with raw_backend(recorder) as backend, FrontDoor(public, backend) as door:
        recorder.door = door
        process = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON, "-c", RAW_HOLD, str(public), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert process.stdout is not None
        assert process.stdin is not None
        await asyncio.wait_for(process.stdout.readline(), WAIT)
        _, caller = recorder.callers.get_nowait()
        assert caller.pid == process.pid

        reused = dataclasses.replace(caller, start_time=caller.start_time + 1)
        with pytest.raises(WorkloadAttestationError) as raised:
            await attestor.attest(reused)
        assert str(raised.value) == (
            f"workload: process {caller.pid} is not the caller: it started at tick {caller.start_time}, "
            f"the caller at tick {caller.start_time + 1} (the caller exited and its pid was reused)"
        )

        process.stdin.close()
        assert await process.wait() == 0
        with pytest.raises(WorkloadAttestationError) as raised:
            await attestor.attest(caller)
        assert str(raised.value) == f"workload: process {caller.pid} has exited"
        await eventually(lambda: door.connections == 0, "the relay closes when the client exits")

        again = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON, "-c", RAW_HOLD, str(public), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(again.communicate(b""), WAIT)
        assert json.loads(out)[0] == f"unix:gid:{os.getegid()}"


def test_peer_names_as_grpc_and_others_write_them() -> None:
    name = "spiffe-peer-0123456789abcdef"
    for peer in (
        f"unix-abstract:{name}",
        f"unix-abstract:%00{name}",
        f"unix-abstract:\0{name}",
        f"unix-abstract:@{name}",
    ):
        assert peer_name(peer) == name, peer
    for peer in ("unix:", "unix:/run/agent.sock", "ipv4:127.0.0.1:1", "unix-abstract:", "unix-abstract:%00", name):
        assert peer_name(peer) is None, peer
    assert peer_name("unix-abstract:%ff%00x") == "\ufffd\x00x"  # a stranger's undecodable name: no error


async def test_caller_for_every_peer_form_of_a_live_connection(public: Path) -> None:
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.put_nowait(backend_peer(writer))
        await reader.read()
        writer.close()

    async with raw_backend(hold) as backend, FrontDoor(public, backend) as door:
        _, writer = await asyncio.open_unix_connection(public)
        writer.write(b"x")
        peer = await asyncio.wait_for(seen.get(), WAIT)
        name = peer_name(peer)
        assert name is not None
        callers = {door.caller_for(f"unix-abstract:{p}{name}") for p in ("", "%00", "\0", "@")}
        assert len(callers) == 1
        caller = callers.pop()
        assert caller is not None
        assert (caller.pid, caller.uid, caller.gid) == (os.getpid(), os.geteuid(), os.getegid())
        assert door.caller_for("unix-abstract:spiffe-peer-ffffffffffffffff") is None
        assert door.caller_for("unix:") is None
        writer.close()
        await eventually(lambda: door.connections == 0, "the relay closes with the client")
        assert door.caller_for(peer) is None


# --- the relay ------------------------------------------------------------------------------------


async def test_many_concurrent_connections_each_get_their_own_bytes(public: Path) -> None:
    count = 1000

    async def one(index: int) -> bytes:
        reader, writer = await asyncio.open_unix_connection(public)
        payload = f"{index:08d}".encode() * (index % 97 + 1)
        writer.write(payload)
        writer.write_eof()
        received = await reader.read()
        writer.close()
        return received if received == payload else b"mismatch"

    async with raw_backend(echo) as backend, FrontDoor(public, backend) as door:
        results = await asyncio.gather(*(one(i) for i in range(count)))
        assert results == [f"{i:08d}".encode() * (i % 97 + 1) for i in range(count)]
        await eventually(lambda: door.connections == 0, "every relay closes")


async def test_connections_beyond_the_limit_are_closed_at_once(public: Path) -> None:
    async with raw_backend(echo) as backend, FrontDoor(public, backend, max_connections=5) as door:
        held = []
        for index in range(5):
            reader, writer = await asyncio.open_unix_connection(public)
            writer.write(b"ping %d\n" % index)
            assert await asyncio.wait_for(reader.readline(), WAIT) == b"ping %d\n" % index
            held.append((reader, writer))
        assert door.connections == 5

        reader, writer = await asyncio.open_unix_connection(public)
        assert await closed_by_peer(reader)
        writer.close()
        assert door.refused == 1

        held.pop()[1].close()
        await eventually(lambda: door.connections == 4, "a closed connection frees its place")
        reader, writer = await asyncio.open_unix_connection(public)
        writer.write(b"again\n")
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"again\n"
        writer.close()
        for _, held_writer in held:
            held_writer.close()
        await eventually(lambda: door.connections == 0, "every relay closes")


async def test_half_close_by_the_client_passes_through(public: Path) -> None:
    async def count_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's EOF
        writer.write(b"got %d" % len(data))
        await writer.drain()
        writer.close()

    async with raw_backend(count_then_answer) as backend, FrontDoor(public, backend) as door:
        reader, writer = await asyncio.open_unix_connection(public)
        writer.write(b"z" * 300_000)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), WAIT) == b"got 300000"
        writer.close()
        await eventually(lambda: door.connections == 0, "the relay closes")


async def test_half_close_by_the_backend_passes_through(public: Path) -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def banner_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner")
        writer.write_eof()
        received.set_result(await reader.read())
        writer.close()

    async with raw_backend(banner_then_listen) as backend, FrontDoor(public, backend) as door:
        reader, writer = await asyncio.open_unix_connection(public)
        assert await asyncio.wait_for(reader.read(), WAIT) == b"banner"
        writer.write(b"still talking after your EOF")
        writer.write_eof()
        assert await asyncio.wait_for(received, WAIT) == b"still talking after your EOF"
        writer.close()
        await eventually(lambda: door.connections == 0, "the relay closes")


async def test_64_mib_both_ways_byte_exact_with_a_slow_reader(public: Path) -> None:
    size, chunk = 64 * MiB, MiB
    upload, download = os.urandom(size), os.urandom(size)
    uploaded: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    downloaded = 0
    most_in_flight = 0

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal most_in_flight

        async def send() -> None:
            nonlocal most_in_flight
            for offset in range(0, size, chunk):
                writer.write(download[offset : offset + chunk])
                await writer.drain()
                most_in_flight = max(most_in_flight, offset + chunk - downloaded)
            writer.write_eof()

        async def receive() -> None:
            digest = hashlib.sha256()
            while data := await reader.read(chunk):
                digest.update(data)
            uploaded.set_result(digest.hexdigest())

        await asyncio.gather(send(), receive())
        writer.close()

    async with raw_backend(exchange) as backend, FrontDoor(public, backend) as door:
        reader, writer = await asyncio.open_unix_connection(public)

        async def send() -> None:
            for offset in range(0, size, chunk):
                writer.write(upload[offset : offset + chunk])
                await writer.drain()
            writer.write_eof()

        async def receive_slowly() -> str:
            nonlocal downloaded
            digest = hashlib.sha256()
            while data := await reader.read(64 * 1024):
                digest.update(data)
                downloaded += len(data)
                await asyncio.sleep(0.0005)
            return digest.hexdigest()

        _, got = await asyncio.gather(send(), receive_slowly())
        writer.close()
        assert got == hashlib.sha256(download).hexdigest()
        assert await uploaded == hashlib.sha256(upload).hexdigest()
        # Backpressure: the fast sender is held back by the slow reader instead of the relay
        # buffering the difference (socket buffers, one read buffer and the write high-water
        # marks: a few MiB at most).
        assert most_in_flight < 8 * MiB, most_in_flight
        await eventually(lambda: door.connections == 0, "the relay closes")


async def test_unreachable_backend_closes_the_client_and_the_door_survives(
    public: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FrontDoor(public, grpc_backend_address("nobody-listens")) as door:
        for _ in range(3):
            reader, writer = await asyncio.open_unix_connection(public)
            writer.write(b"hello")
            assert await closed_by_peer(reader)
            writer.close()
        await eventually(lambda: door.connections == 0, "failed relays are forgotten")
    warnings = [r.getMessage() for r in caplog.records if r.name == "sidecar.agent.peer"]
    assert warnings == ["front door: cannot reach the private gRPC server"]  # rate-limited


async def test_the_backend_closing_closes_the_client_and_forgets_the_caller(public: Path) -> None:
    peers: asyncio.Queue[str] = asyncio.Queue()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.put_nowait(backend_peer(writer))
        await reader.readexactly(1)
        writer.close()

    async with raw_backend(hang_up) as backend, FrontDoor(public, backend) as door:
        reader, writer = await asyncio.open_unix_connection(public)
        writer.write(b"x")
        peer = await asyncio.wait_for(peers.get(), WAIT)
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # the backend's EOF, passed on
        assert door.caller_for(peer) is not None  # a half-close: the client may still write
        writer.close()
        await eventually(lambda: door.connections == 0, "the relay closes")
        assert door.caller_for(peer) is None


async def test_close_ends_every_relay_and_removes_the_socket(public: Path) -> None:
    async with raw_backend(echo) as backend:
        door = FrontDoor(public, backend)
        await door.start()
        clients = [await asyncio.open_unix_connection(public) for _ in range(10)]
        for reader, writer in clients:
            writer.write(b"hi\n")
            assert await asyncio.wait_for(reader.readline(), WAIT) == b"hi\n"
        await door.close()
        assert door.connections == 0
        assert not public.exists()
        for reader, writer in clients:
            assert await closed_by_peer(reader)
            writer.close()
        await door.close()  # idempotent


# --- the public socket file -----------------------------------------------------------------------


async def test_socket_and_directory_modes(public: Path) -> None:
    umask = os.umask(0o077)
    try:
        async with FrontDoor(public, grpc_backend_address()) as door:
            assert door.path == public
            assert stat.S_IMODE(public.parent.stat().st_mode) == 0o755
            assert stat.S_ISSOCK(public.lstat().st_mode)
            assert stat.S_IMODE(public.lstat().st_mode) == 0o777
        assert not public.exists()
        assert public.parent.is_dir()
    finally:
        os.umask(umask)


async def test_a_stale_socket_is_replaced(public: Path) -> None:
    public.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(public))
    stale.close()  # the file stays, nobody listens
    async with raw_backend(echo) as backend, FrontDoor(public, backend):
        reader, writer = await asyncio.open_unix_connection(public)
        writer.write(b"fresh\n")
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"fresh\n"
        writer.close()


async def test_a_live_socket_or_another_file_is_never_removed(public: Path) -> None:
    public.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(public))
        live.listen()
        with pytest.raises(FrontDoorError) as raised:
            await FrontDoor(public, grpc_backend_address()).start()
        assert str(raised.value) == f'frontdoor: another process is listening on the socket path: "{public}"'
        assert public.exists()
    public.unlink()
    public.write_text("not a socket")
    with pytest.raises(FrontDoorError) as raised:
        await FrontDoor(public, grpc_backend_address()).start()
    assert str(raised.value) == f'frontdoor: socket path exists and is not a socket: "{public}"'
    assert public.read_text() == "not a socket"


async def test_start_twice_is_an_error(public: Path) -> None:
    async with FrontDoor(public, grpc_backend_address()) as door:
        with pytest.raises(FrontDoorError) as raised:
            await door.start()
        assert str(raised.value) == f'frontdoor: front door was already started: "{public}"'


def test_backend_addresses() -> None:
    address = grpc_backend_address()
    assert re.fullmatch(r"unix-abstract:spiffe-agent-[0-9a-f]{24}", address)
    assert address != grpc_backend_address()
    assert socket_address("unix-abstract:x") == b"\0x"
    assert socket_address("unix:relative.sock") == "relative.sock"
    assert socket_address("unix:/run/a.sock") == "/run/a.sock"
    assert socket_address("unix:///run/a.sock") == "/run/a.sock"
    for bad, rule in [
        ("unix-abstract:", "abstract address has no name"),
        ("unix://host/run/a.sock", "unix:// address must have an absolute path and no authority"),
        ("unix:", "backend address must be unix-abstract:<name> or unix:<path>"),
        ("dns:localhost:1", "backend address must be unix-abstract:<name> or unix:<path>"),
    ]:
        with pytest.raises(FrontDoorError) as raised:
            socket_address(bad)
        assert str(raised.value) == f'frontdoor: {rule}: "{bad}"'
    with pytest.raises(ValueError, match="max_connections must be at least 1, not 0"):
        FrontDoor("/run/x.sock", address, max_connections=0)
