"""The node agent survives its control plane going away, and its own restart.

A server, an agent and one workload entry (uid 0, 30 s X.509 TTL: counting the 10 s backdating,
each SVID lives 40 s and is renewed 6-14 s after it was issued) for this module alone: the tests
stop and restart them, in order.

1. The server is stopped (SIGTERM) right after a rotation and stays down past the moment the
   workload's SVID was due for renewal, more than half a rotation period. Meanwhile the agent still
   serves the SVID it has, valid. The server comes back on the same data dir and port, and the
   workload's stream delivers a new SVID before the old one expires.
2. The agent is restarted (SIGTERM, then ``run`` with no join token and no trust bundle): it resumes
   with its persisted identity, same agent ID, and the workloads' streams (py-spiffe's and ours)
   reconnect and receive an SVID from the new process.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import pytest

from sidecar.agent.rotation import renew_at
from sidecar.workload.client import WorkloadAPIClient
from sidecar.workload.source import X509Source
from spiffecore import X509SVID, verify_x509_svid
from tests.support.agent import (
    AgentProcess,
    read_event,
    remove_socket_dir,
    socket_dir,
    start_agent,
    start_workload,
    stop_workload,
    write_roots,
)
from tests.support.server import ServerProcess, start_server

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the workload entry is for uid 0")

TD: Final = "spiffe://example.org"
NODE: Final = f"{TD}/node/resilience"
WORKLOAD_ID: Final = f"{TD}/resilience/root"
TTL: Final = 30
BACKDATE: Final = 10.0

# py-spiffe's streaming watcher, reconnecting by itself (its default retry policy), reporting each update.
WATCHER: Final = r"""
import json
import threading

from spiffe import WorkloadApiClient


def emit(kind, **data):
    print(json.dumps({"kind": kind, **data}), flush=True)


def update(context):
    svid = context.default_svid
    emit("update", id=str(svid.spiffe_id), serial=svid.leaf.serial_number)


drop_ids()
client = WorkloadApiClient(default_timeout=30)
watcher = client.stream_x509_contexts(on_success=update, on_error=lambda err: emit("error", message=repr(err)))
threading.Event().wait()
"""


@dataclass
class Updates:
    """The watcher's updates as they arrive, each with its arrival time (``time.monotonic()``)."""

    process: asyncio.subprocess.Process
    queue: asyncio.Queue[tuple[float, dict[str, Any]]] = field(default_factory=asyncio.Queue)
    errors: list[str] = field(default_factory=list)

    async def pump(self) -> None:
        while True:
            event = await read_event(self.process, timeout=3600)
            if event["kind"] == "error":
                self.errors.append(event["message"])
            else:
                self.queue.put_nowait((time.monotonic(), event))

    async def next(self, timeout: float) -> tuple[float, dict[str, Any]]:
        try:
            async with asyncio.timeout(timeout):
                return await self.queue.get()
        except TimeoutError:
            raise AssertionError(f"no update from the workload within {timeout:.1f}s; errors: {self.errors}") from None

    def drain(self) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        while not self.queue.empty():
            seen.append(self.queue.get_nowait()[1])
        return seen


@dataclass
class Plant:
    """The module's server and agent, restartable in place."""

    server: ServerProcess
    port: int
    agent: AgentProcess
    socket: Path

    def restart_server(self) -> None:
        self.server = start_server(self.server.data_dir, extra=["--bind", f"127.0.0.1:{self.port}"])

    def restart_agent(self) -> None:
        self.agent.stop()
        self.agent = start_agent(self.agent.data_dir, self.server.address, socket_path=self.socket)


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plant]:
    directory = tmp_path_factory.mktemp("resilience")
    server = start_server(directory / "server", extra=["--bind", "127.0.0.1:0"])
    port = int(server.address.rpartition(":")[2])
    sockets = socket_dir()
    agent: AgentProcess | None = None
    try:
        token = server.token("--spiffe-id", NODE)
        server.cli(
            "entry", "create", "--spiffe-id", WORKLOAD_ID, "--parent-id", NODE, "--selector", "unix:uid:0",
            "--x509-ttl", str(TTL),
        )  # fmt: skip
        agent = start_agent(
            directory / "agent",
            server.address,
            socket_path=sockets / "api.sock",
            join_token=token,
            trust_bundle=write_roots(server, directory / "roots.pem"),
        )
        plant = Plant(server=server, port=port, agent=agent, socket=sockets / "api.sock")
        yield plant
        server, agent = plant.server, plant.agent
    finally:
        if agent is not None:
            if agent.process.poll() is None:
                agent.stop()
            else:
                agent._close_files()
        if server.process.poll() is None:
            server.stop()
        else:
            server._close_files()
        remove_socket_dir(sockets)


@pytest.fixture
async def updates(plant: Plant) -> AsyncIterator[Updates]:
    """py-spiffe's streaming watcher in its own process, for the test."""
    process = await start_workload(WATCHER, endpoint=plant.agent.endpoint)
    watched = Updates(process)
    task = asyncio.create_task(watched.pump())
    try:
        yield watched
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError, AssertionError):
            await task
        await stop_workload(process)


async def fetch(agent: AgentProcess) -> tuple[X509SVID, datetime]:
    """The workload's SVID through the agent (this process is the uid-0 workload), verified now."""
    async with WorkloadAPIClient(agent.endpoint, timeout=10) as client:
        context = await client.fetch_x509_context()
    now = datetime.now(UTC)
    (svid,) = context.svids
    assert str(svid.id) == WORKLOAD_ID
    assert verify_x509_svid(list(svid.cert_chain), context.bundle, at=now).id == svid.id
    return svid, now


async def test_svids_stay_valid_while_the_server_is_down_and_rotation_resumes(plant: Plant, updates: Updates) -> None:
    _, first = await updates.next(timeout=30)
    assert first["id"] == WORKLOAD_ID
    # Start the outage right after a rotation, the SVID at the start of its life.
    _, rotated = await updates.next(timeout=TTL)
    assert rotated["serial"] != first["serial"]
    svid, now = await fetch(plant.agent)
    assert svid.leaf.serial_number == rotated["serial"]
    due = renew_at(svid.leaf)
    issued = svid.leaf.not_valid_before_utc.timestamp() + BACKDATE
    rotation_period = due.timestamp() - issued

    stopped = time.monotonic()
    plant.server.stop()
    # Down past the moment the SVID was due: the agent cannot renew it, and must keep serving it.
    await asyncio.sleep(max((due - datetime.now(UTC)).total_seconds(), 0.0) + 1.0)
    during, now = await fetch(plant.agent)  # verified at `now`: still valid
    assert during.leaf.serial_number == svid.leaf.serial_number
    assert now > due
    assert now < during.expires_at
    assert updates.drain() == [], "nothing can have been rotated without the server"
    outage = time.monotonic() - stopped
    assert outage > rotation_period / 2, (outage, rotation_period)

    plant.restart_server()
    restarted = time.monotonic()
    arrived, update = await updates.next(timeout=(svid.expires_at - datetime.now(UTC)).total_seconds())
    assert update["serial"] != svid.leaf.serial_number
    assert update["id"] == WORKLOAD_ID
    after, now = await fetch(plant.agent)
    assert after.leaf.serial_number == update["serial"]
    assert now < svid.expires_at, "the new SVID came only after the old one expired"
    assert arrived - restarted < TTL
    assert "the entry watch stream ended; reconnecting with backoff" in plant.agent.stderr


async def test_a_restarted_agent_keeps_its_id_and_watches_reconnect(plant: Plant, updates: Updates) -> None:
    _, before = await updates.next(timeout=30)
    agent_id = plant.agent.agent_id
    async with WorkloadAPIClient(plant.agent.endpoint) as client, X509Source(client.watch_x509_context) as ours:
        await ours.ready()
        updates.drain()
        restarting = time.monotonic()
        plant.restart_agent()  # no join token, no trust bundle: what the data dir holds
        assert plant.agent.agent_id == agent_id
        assert "resuming with the persisted agent SVID" in plant.agent.stderr
        assert "--join-token" not in " ".join(str(arg) for arg in plant.agent.process.args)  # type: ignore[union-attr]

        # py-spiffe's watcher reconnects and gets an SVID from the new process (its cache starts empty).
        while True:
            arrived, update = await updates.next(timeout=30)
            if arrived > restarting:
                break
        assert update["id"] == WORKLOAD_ID
        assert update["serial"] != before["serial"]
        new_serials = {update["serial"]}

        # So does ours.
        deadline = time.monotonic() + 30
        while ours.svid().leaf.serial_number not in new_serials:
            new_serials |= {u["serial"] for u in updates.drain()}
            svid, _ = await fetch(plant.agent)
            new_serials.add(svid.leaf.serial_number)
            assert time.monotonic() < deadline, f"our X509Source did not reconnect: {ours.last_error}"
            await asyncio.sleep(0.1)
        assert str(ours.svid().id) == WORKLOAD_ID
