"""The k8s workload attestor end to end: a real spiffe-server, a real spiffe-agent, workloads as processes.

The agent runs with ``workload_attestors.k8s.enabled: true``; its kubelet is a real HTTP server on
127.0.0.1 serving a recorded pod list (``tests/sidecar/agent/fixtures``), and its ``proc_root`` is
a temporary directory. Each workload is a real process that waits on its stdin before it calls
the Workload API; meanwhile the test writes ``<proc_root>/<pid>/cgroup`` (the cgroup of a pod's
container, or of a host process) and ``<proc_root>/<pid>/stat`` (a copy of the process's real
one, so the attestor's PID-reuse check sees the real start time). The unix attestor still reads
the real ``/proc``, so both kinds of selectors meet in one registration entry.

Entries, made before the agent starts, all parented by the agent's alias ``NODE``:

- ``API_ID``: ``k8s:ns:payments``, ``k8s:sa:api``, ``k8s:pod-label:app:api``: every container
  of the api pod;
- ``ENVOY_ID``: ``k8s:pod-label:app:api``, ``k8s:container-name:envoy``, ``unix:uid:0``: only
  its Envoy sidecar running as root;
- ``HOST_ID``: ``unix:uid:65534``: a host process of nobody, in no pod.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from tests.sidecar.agent.kubelet import FakeKubelet, fixture, running_kubelet
from tests.support.agent import (
    DROP_IDS,
    AgentProcess,
    RunAs,
    endpoint_env,
    finish_workload,
    read_event,
    remove_socket_dir,
    running_agent,
    socket_dir,
    stop_workload,
    write_roots,
)
from tests.support.server import ServerProcess

TD: Final = "spiffe://example.org"
NODE: Final = f"{TD}/node/k8s-e2e"
API_ID: Final = f"{TD}/ns/payments/sa/api"
ENVOY_ID: Final = f"{TD}/ns/payments/sa/api/envoy"
HOST_ID: Final = f"{TD}/host/nobody"
NOBODY: Final = RunAs(65534, 65534)

API_UID: Final = "3f1c9a52-6b0e-4d7a-9c41-2e8b5f6d7a10"
BATCH_UID: Final = "9a0e7c31-44f2-4b8d-a6e5-1c2d3e4f5a6b"
API: Final = "14c2529eb4498c5d1ffd6915d05bf58a91bdda796af59f41d480d11c099d0479"
ENVOY: Final = "84532b306f259587c364bd7301e0813963d5b84fd27c9338f0862dab8f0499d7"
WORKER: Final = "87eba76e7f3164534045ba922e7770fb58bbd14ad732bbf5ba6f11cc56989e6e"
POLL_ATTEMPTS: Final = 10
NO_IDENTITY: Final = {"code": "PERMISSION_DENIED", "message": "no identity issued"}

# Waits for a line on stdin (the test writes its cgroup meanwhile), then asks for its X.509 identities.
GATED: Final = r"""
import asyncio
import json
import sys

from sidecar.workload.client import WorkloadAPIClient, WorkloadAPIError


def emit(kind, **data):
    print(json.dumps({"kind": kind, **data}), flush=True)


async def main():
    sys.stdin.readline()
    drop_ids()
    async with WorkloadAPIClient(timeout=20) as client:
        try:
            context = await client.fetch_x509_context()
            emit("x509", ids=sorted(str(svid.id) for svid in context.svids))
        except WorkloadAPIError as err:
            emit("x509", code=err.code.name, message=err.message)


asyncio.run(main())
"""


def pod_cgroup(pod_uid: str, container: str) -> bytes:
    """Cgroup v2 with the systemd driver and containerd, as a Burstable pod's container has it."""
    pod = f"kubepods-burstable-pod{pod_uid.replace('-', '_')}.slice"
    return f"0::/kubepods.slice/kubepods-burstable.slice/{pod}/cri-containerd-{container}.scope\n".encode()


HOST_CGROUP: Final = b"0::/user.slice/user-0.slice/session-4.scope\n"


# --- the kubelet, the proc root, the server's entries and the agent ----------------------------------


@pytest.fixture(scope="module")
def kubelet() -> Iterator[FakeKubelet]:
    with running_kubelet() as server:
        yield server


@pytest.fixture(autouse=True)
def recorded_pods(kubelet: FakeKubelet) -> None:
    """Every test starts with the kubelet serving the recorded list of node-1."""
    kubelet.serve(fixture("containerd"))


@pytest.fixture(scope="module")
def proc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("proc")


@pytest.fixture(scope="module")
def entries(server: ServerProcess) -> None:
    for spiffe_id, selectors in (
        (API_ID, ("k8s:ns:payments", "k8s:sa:api", "k8s:pod-label:app:api")),
        (ENVOY_ID, ("k8s:pod-label:app:api", "k8s:container-name:envoy", "unix:uid:0")),
        (HOST_ID, (f"unix:uid:{NOBODY.uid}",)),
    ):
        options = [part for selector in selectors for part in ("--selector", selector)]
        server.cli_json("entry", "create", "--spiffe-id", spiffe_id, "--parent-id", NODE, *options)


@pytest.fixture(scope="module")
def agent(
    server: ServerProcess,
    entries: None,
    kubelet: FakeKubelet,
    proc_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AgentProcess]:
    directory = tmp_path_factory.mktemp("k8s-agent")
    config = directory / "agent.yaml"
    config.write_text(
        "trust_domain: example.org\n"
        "workload_attestors:\n"
        "  k8s:\n"
        "    enabled: true\n"
        f"    pods_url: {kubelet.url}\n"
        "    node_name: node-1\n"
        f"    proc_root: {proc_root}\n"
        f"    max_poll_attempts: {POLL_ATTEMPTS}\n"
        "    poll_interval: 100ms\n"
        "    cache_ttl: 0\n"
    )
    sockets = socket_dir("k8s-e2e")
    try:
        with running_agent(
            directory / "data",
            server.address,
            socket_path=sockets / "api.sock",
            join_token=server.token("--spiffe-id", NODE),
            trust_bundle=write_roots(server, directory / "roots.pem"),
            extra=["--config", str(config)],
        ) as process:
            yield process
    finally:
        remove_socket_dir(sockets)


async def attest_as(
    agent: AgentProcess, proc_root: Path, cgroup: bytes, *, run_as: RunAs | None = None
) -> dict[str, Any]:
    """Start a gated workload, give it ``cgroup`` in the proc root, let it call; what it got."""
    env = endpoint_env(agent.endpoint)
    env.pop("TEST_DROP_IDS", None)
    if run_as is not None:
        env.update(run_as.env())
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DROP_IDS + GATED,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        directory = proc_root / str(process.pid)
        directory.mkdir()
        (directory / "stat").write_bytes(Path(f"/proc/{process.pid}/stat").read_bytes())
        (directory / "cgroup").write_bytes(cgroup)
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        await process.stdin.drain()
        event = await read_event(process)
        await finish_workload(process)
    finally:
        await stop_workload(process)
    assert event.pop("kind") == "x509", event
    return event


# --- the tests -----------------------------------------------------------------------------------------


async def test_a_pods_container_gets_the_identity_its_k8s_selectors_select(
    agent: AgentProcess, proc_root: Path, kubelet: FakeKubelet
) -> None:
    before = kubelet.request_count
    assert await attest_as(agent, proc_root, pod_cgroup(API_UID, API)) == {"ids": [API_ID]}
    assert kubelet.request_count > before  # the agent asked the kubelet


async def test_unix_and_k8s_selectors_meet_in_one_entry(agent: AgentProcess, proc_root: Path) -> None:
    # The Envoy sidecar of the same pod, as root: both entries apply.
    assert await attest_as(agent, proc_root, pod_cgroup(API_UID, ENVOY)) == {"ids": sorted([API_ID, ENVOY_ID])}


async def test_a_container_of_a_pod_no_entry_selects_gets_no_identity(agent: AgentProcess, proc_root: Path) -> None:
    # The batch pod: same namespace, another service account and label.
    assert await attest_as(agent, proc_root, pod_cgroup(BATCH_UID, WORKER)) == NO_IDENTITY


@pytest.mark.skipif(os.geteuid() != 0, reason="the host workload runs as nobody: starting it needs root")
async def test_a_host_process_is_attested_by_its_unix_selectors_alone(
    agent: AgentProcess, proc_root: Path, kubelet: FakeKubelet
) -> None:
    kubelet.serve(b"the kubelet is broken", status=500)  # a host process never needs it
    assert await attest_as(agent, proc_root, HOST_CGROUP, run_as=NOBODY) == {"ids": [HOST_ID]}
    # A root host process: no unix-only entry of root, no k8s selectors, so nothing.
    assert await attest_as(agent, proc_root, HOST_CGROUP) == NO_IDENTITY


async def test_a_container_just_started_is_served_once_the_kubelet_lists_it(
    agent: AgentProcess, proc_root: Path, kubelet: FakeKubelet
) -> None:
    starting = fixture("containerd")
    starting["items"][0]["status"]["containerStatuses"][0].pop("containerID")  # api: ContainerCreating
    kubelet.serve(starting)
    calls = kubelet.request_count
    workload = asyncio.create_task(attest_as(agent, proc_root, pod_cgroup(API_UID, API)))
    while kubelet.request_count < calls + 2:  # the agent is polling
        assert not workload.done(), workload.result()
        await asyncio.sleep(0.01)
    kubelet.serve(fixture("containerd"))
    assert await workload == {"ids": [API_ID]}


async def test_a_container_the_kubelet_never_lists_gets_no_k8s_selectors(
    agent: AgentProcess, proc_root: Path, kubelet: FakeKubelet
) -> None:
    unknown = "e" * 64
    calls = kubelet.request_count
    assert await attest_as(agent, proc_root, pod_cgroup(API_UID, unknown)) == NO_IDENTITY
    assert kubelet.request_count - calls == POLL_ATTEMPTS
    assert "the caller's container is not in the kubelet's pod list" in agent.stderr
    assert unknown in agent.stderr


async def test_a_broken_kubelet_makes_the_call_unavailable(
    agent: AgentProcess, proc_root: Path, kubelet: FakeKubelet
) -> None:
    kubelet.serve(b"<html>bad gateway</html>", status=502)
    event = await attest_as(agent, proc_root, pod_cgroup(API_UID, API))
    assert event == {
        "code": "UNAVAILABLE",
        "message": "could not attest the calling process (workload: k8s: cannot list the pods of this node from "
        f'{kubelet.url}: it answered 502 "Bad Gateway": "<html>bad gateway</html>")',
    }
    # The kubelet back, the same workload's next call is served (nothing bad was kept).
    kubelet.serve(fixture("containerd"))
    assert await attest_as(agent, proc_root, pod_cgroup(API_UID, API)) == {"ids": [API_ID]}


async def test_a_kubelet_of_another_node_is_refused(agent: AgentProcess, proc_root: Path, kubelet: FakeKubelet) -> None:
    kubelet.serve(fixture("crio"))  # worker-a's pods, and this agent is on node-1
    event = await attest_as(agent, proc_root, pod_cgroup(API_UID, API))
    assert event["code"] == "UNAVAILABLE"
    assert "it lists pods of node 'worker-a', and this agent runs on node 'node-1'" in event["message"]
