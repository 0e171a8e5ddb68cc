"""The k8s workload attestor: a /proc-shaped tree in a temporary directory, a real HTTP server as the kubelet.

The processes' cgroup files are written into the tree (``<pid>/cgroup``, with a ``<pid>/stat``
holding the start time the front door would have recorded), and the kubelet is
:class:`~tests.sidecar.agent.kubelet.FakeKubelet` serving the recorded pod lists. The combined
attestor is also run against a real process, whose real ``/proc`` the unix attestor reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from sidecar.agent.app import workload_attestor
from sidecar.agent.attestors import CombinedAttestor
from sidecar.agent.attestors.base import Caller, WorkloadAttestationError, read_stat
from sidecar.agent.attestors.k8s import K8sAttestor, K8sAttestorConfig, PodListCache, node_name_from
from sidecar.agent.attestors.k8s_kubelet import KubeletError
from sidecar.agent.attestors.k8s_pods import Pod, PodList
from sidecar.agent.attestors.unix import UnixAttestor
from sidecar.agent.config import AgentConfig, K8sAttestorSection
from spiffeops.config import ConfigError, parse_config
from tests.sidecar.agent.kubelet import FakeKubelet, fixture, running_kubelet
from tests.sidecar.agent.test_k8s_pods import API, API_IMAGE_ID, API_POD, ENVOY, WORKER

API_UID: Final = "3f1c9a52-6b0e-4d7a-9c41-2e8b5f6d7a10"
BATCH_UID: Final = "9a0e7c31-44f2-4b8d-a6e5-1c2d3e4f5a6b"
PID: Final = 4321
START: Final = 987654
CALLER: Final = Caller(pid=PID, uid=1000, gid=1000, start_time=START)
API_SELECTORS: Final = API_POD | {
    "k8s:container-name:api",
    "k8s:container-image:ghcr.io/example/api:1.4.2",
    f"k8s:container-image:{API_IMAGE_ID}",
}


def cgroup_of(pod_uid: str, container: str) -> bytes:
    """A cgroup v2 file under the systemd driver (containerd), as a Burstable pod's process has it."""
    pod = f"kubepods-burstable-pod{pod_uid.replace('-', '_')}.slice"
    return f"0::/kubepods.slice/kubepods-burstable.slice/{pod}/cri-containerd-{container}.scope\n".encode()


def stat_line(pid: int, start: int) -> bytes:
    return f"{pid} (workload) S 1 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start} 1000 100 0 0 0 0\n".encode()


def write_process(root: Path, pid: int, cgroup: bytes | None, *, start: int = START) -> None:
    directory = root / str(pid)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stat").write_bytes(stat_line(pid, start))
    if cgroup is not None:
        (directory / "cgroup").write_bytes(cgroup)


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    with running_kubelet() as server:
        server.serve(fixture("containerd"))
        yield server


def attestor_for(kubelet: FakeKubelet, proc: Path, **options: object) -> K8sAttestor:
    config = K8sAttestorConfig(pods_url=kubelet.url, proc_root=proc, **options)  # type: ignore[arg-type]
    return K8sAttestor(config)


async def refusal(attestor: K8sAttestor | CombinedAttestor, caller: Caller = CALLER) -> str:
    with pytest.raises(WorkloadAttestationError) as raised:
        await attestor.attest(caller)
    return str(raised.value)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- attestation -----------------------------------------------------------------------------------


async def test_a_container_of_a_pod_gets_its_pods_and_containers_selectors(
    kubelet: FakeKubelet, tmp_path: Path
) -> None:
    write_process(tmp_path, PID, cgroup_of(API_UID, API))
    assert await attestor_for(kubelet, tmp_path).attest(CALLER) == API_SELECTORS
    assert kubelet.requests == ["/pods"]


@pytest.mark.parametrize(
    "cgroup",
    [
        b"0::/user.slice/user-1000.slice/session-3.scope\n",
        b"12:pids:/system.slice/ssh.service\n1:name=systemd:/system.slice/ssh.service\n0::/system.slice/ssh.service\n",
        f"0::/kubepods/besteffort/pod{API_UID}\n".encode(),
    ],
)
async def test_a_process_in_no_pod_gets_no_k8s_selectors_and_the_kubelet_is_not_asked(
    tmp_path: Path, cgroup: bytes
) -> None:
    write_process(tmp_path, PID, cgroup)
    # Not even reachable: a host process never needs it.
    attestor = K8sAttestor(K8sAttestorConfig(pods_url=f"http://127.0.0.1:{closed_port()}/pods", proc_root=tmp_path))
    assert await attestor.attest(CALLER) == frozenset()
    assert attestor.pods.fetches == 0


async def test_a_container_just_started_is_found_once_the_kubelet_lists_it(
    kubelet: FakeKubelet, tmp_path: Path
) -> None:
    listed = fixture("containerd")
    unlisted = fixture("containerd")
    unlisted["items"][1]["status"]["containerStatuses"][0].pop("containerID")  # the worker is being created
    kubelet.serve(unlisted)
    write_process(tmp_path, PID, cgroup_of(BATCH_UID, WORKER))
    attestor = attestor_for(kubelet, tmp_path, poll_interval=0.02, max_poll_attempts=200, cache_ttl=10.0)
    attesting = asyncio.create_task(attestor.attest(CALLER))
    while kubelet.request_count < 3:  # it asks again and again, despite the 10 s cache
        await asyncio.sleep(0.01)
    kubelet.serve(listed)
    selectors = await attesting
    assert {"k8s:ns:payments", "k8s:sa:batch", "k8s:container-name:worker"} <= selectors
    assert kubelet.request_count < 10


async def test_a_container_never_listed_is_attested_without_k8s_selectors(
    kubelet: FakeKubelet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unknown = "ab" * 32
    write_process(tmp_path, PID, cgroup_of(API_UID, unknown))
    attestor = attestor_for(kubelet, tmp_path, poll_interval=0.01, max_poll_attempts=3)
    with caplog.at_level(logging.WARNING, logger="sidecar.agent.attestors.k8s"):
        assert await attestor.attest(CALLER) == frozenset()
    assert kubelet.request_count == 3
    [record] = caplog.records
    assert record.getMessage() == (
        "k8s attestor: the caller's container is not in the kubelet's pod list; attested without k8s selectors"
    )
    assert (record.pid, record.pod_uid, record.container_id, record.attempts) == (PID, API_UID, unknown, 3)  # type: ignore[attr-defined]


async def test_one_attempt_means_no_retry(kubelet: FakeKubelet, tmp_path: Path) -> None:
    write_process(tmp_path, PID, cgroup_of(API_UID, "cd" * 32))
    attestor = attestor_for(kubelet, tmp_path, poll_interval=30.0, max_poll_attempts=1)
    assert await asyncio.wait_for(attestor.attest(CALLER), 5) == frozenset()
    assert kubelet.request_count == 1


async def test_an_unreachable_kubelet_fails_attestation_of_a_pods_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/pods"
    write_process(tmp_path, PID, cgroup_of(API_UID, API))
    attestor = K8sAttestor(K8sAttestorConfig(pods_url=url, proc_root=tmp_path))
    with caplog.at_level(logging.WARNING, logger="sidecar.agent.attestors.k8s"):
        message = await refusal(attestor)
    assert message.startswith(f"workload: k8s: cannot list the pods of this node from {url}: cannot reach it: ")
    assert [record.getMessage() for record in caplog.records] == ["k8s attestor: cannot list the pods of this node"]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"[1 2]", 200, "the answer is not JSON: Expecting ',' delimiter: line 1 column 4 (char 3)"),
        (b"Unauthorized", 401, 'it answered 401 "Unauthorized": "Unauthorized"'),
    ],
)  # fmt: skip
async def test_a_kubelet_answering_nonsense_fails_attestation(
    kubelet: FakeKubelet, tmp_path: Path, body: bytes, status: int, reason: str
) -> None:
    kubelet.serve(body, status=status)
    write_process(tmp_path, PID, cgroup_of(API_UID, API))
    message = await refusal(attestor_for(kubelet, tmp_path))
    assert message == f"workload: k8s: cannot list the pods of this node from {kubelet.url}: {reason}"


async def test_the_container_must_be_in_the_pod_its_cgroup_names(kubelet: FakeKubelet, tmp_path: Path) -> None:
    write_process(tmp_path, PID, cgroup_of(BATCH_UID, API))
    assert await refusal(attestor_for(kubelet, tmp_path)) == (
        f"workload: k8s: the cgroup of process {PID} names pod {BATCH_UID}, but the kubelet lists its container "
        f"{API} in pod {API_UID} (payments/api-7c9d8f6b5-x2k4p)"
    )


async def test_pods_of_another_node_are_refused_when_the_node_is_known(kubelet: FakeKubelet, tmp_path: Path) -> None:
    write_process(tmp_path, PID, cgroup_of(API_UID, API))
    assert await attestor_for(kubelet, tmp_path, node_name="node-1").attest(CALLER) == API_SELECTORS
    assert await refusal(attestor_for(kubelet, tmp_path, node_name="node-2")) == (
        f"workload: k8s: cannot list the pods of this node from {kubelet.url}: it lists pods of node 'node-1', "
        "and this agent runs on node 'node-2' (is pods_url this node's kubelet?)"
    )


async def test_a_reused_pid_is_not_the_caller(kubelet: FakeKubelet, tmp_path: Path) -> None:
    write_process(tmp_path, PID, cgroup_of(API_UID, API), start=START + 1)
    assert await refusal(attestor_for(kubelet, tmp_path)) == (
        f"workload: process {PID} is not the caller: it started at tick {START + 1}, the caller at tick {START} "
        "(the caller exited and its pid was reused)"
    )
    assert kubelet.request_count == 0


async def test_a_process_that_exited(kubelet: FakeKubelet, tmp_path: Path) -> None:
    assert await refusal(attestor_for(kubelet, tmp_path)) == f"workload: process {PID} has exited"
    write_process(tmp_path, PID, None)  # a directory without its cgroup file: the process went meanwhile
    assert await refusal(attestor_for(kubelet, tmp_path)) == f"workload: process {PID} has exited"


async def test_a_malformed_cgroup_file(kubelet: FakeKubelet, tmp_path: Path) -> None:
    write_process(tmp_path, PID, b"garbage\n")
    assert await refusal(attestor_for(kubelet, tmp_path)) == (
        f"workload: k8s: malformed cgroup file of process {PID}: "
        'line 1 is not <hierarchy id>:<controllers>:<path>: "garbage"'
    )


async def test_a_burst_of_callers_costs_one_kubelet_call(kubelet: FakeKubelet, tmp_path: Path) -> None:
    containers = [(API_UID, API), (API_UID, ENVOY), (BATCH_UID, WORKER)]
    callers = []
    for index in range(150):
        pid = 10_000 + index
        write_process(tmp_path, pid, cgroup_of(*containers[index % 3]), start=pid)
        callers.append(Caller(pid=pid, uid=0, gid=0, start_time=pid))
    attestor = attestor_for(kubelet, tmp_path)
    results = await asyncio.gather(*(attestor.attest(caller) for caller in callers))
    assert kubelet.request_count == 1
    assert results[0] == API_SELECTORS
    assert "k8s:container-name:envoy" in results[1]
    assert "k8s:sa:batch" in results[2]


async def test_an_outage_costs_one_call_per_ttl_and_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_process(tmp_path, PID, cgroup_of(API_UID, API))
    url = f"http://127.0.0.1:{closed_port()}/pods"
    attestor = K8sAttestor(K8sAttestorConfig(pods_url=url, proc_root=tmp_path, cache_ttl=60.0))
    with caplog.at_level(logging.WARNING, logger="sidecar.agent.attestors.k8s"):
        burst = await asyncio.gather(*(attestor.attest(CALLER) for _ in range(50)), return_exceptions=True)
        later = await refusal(attestor)
    assert {type(outcome) for outcome in burst} == {WorkloadAttestationError}
    assert {str(outcome) for outcome in burst} == {later}
    assert attestor.pods.fetches == 1
    assert len(caplog.records) == 1


# --- the pod list cache --------------------------------------------------------------------------------


class Source:
    """Pod lists (or failures) for the cache, counting calls; each call waits for ``gate`` if set."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> PodList:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise KubeletError(f"failure {self.calls}")
        return PodList(pods=(Pod(uid=str(self.calls), name="p", namespace="n"),))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_list_is_reused_for_the_ttl() -> None:
    source, clock = Source(), Clock()
    cache = PodListCache(source, ttl=1.0, clock=clock)
    first = await cache.get()
    clock.now += 0.99
    assert await cache.get() == first
    clock.now += 0.02
    second = await cache.get()
    assert second[0] == first[0] + 1
    assert second[1].pods[0].uid == "2"
    assert source.calls == cache.fetches == 2


async def test_asking_for_a_newer_list_fetches_one_even_within_the_ttl() -> None:
    source = Source()
    cache = PodListCache(source, ttl=60.0, clock=Clock())
    generation, _ = await cache.get()
    newer, pods = await cache.get(after=generation)
    assert newer > generation
    assert pods.pods[0].uid == "2"
    assert await cache.get(after=generation) == (newer, pods)  # someone else's newer list serves too


async def test_callers_share_a_fetch_under_way_and_one_leaving_does_not_cancel_it() -> None:
    source = Source()
    source.gate = asyncio.Event()
    cache = PodListCache(source, ttl=0.0)
    waiting = [asyncio.create_task(cache.get()) for _ in range(20)]
    await asyncio.sleep(0.01)
    waiting[0].cancel()
    source.gate.set()
    results = await asyncio.gather(*waiting[1:])
    assert source.calls == 1
    assert {generation for generation, _ in results} == {1}


async def test_a_failure_is_remembered_for_the_ttl() -> None:
    source, clock = Source(), Clock()
    source.fail = True
    cache = PodListCache(source, ttl=1.0, clock=clock)
    for _ in range(3):
        with pytest.raises(KubeletError, match=r"^failure 1$"):
            await cache.get()
    clock.now += 1.0
    source.fail = False
    assert (await cache.get())[1].pods[0].uid == "2"


async def test_a_ttl_of_zero_fetches_every_time() -> None:
    source = Source()
    cache = PodListCache(source, ttl=0.0)
    for _ in range(3):
        await cache.get()
    assert source.calls == 3


def test_the_ttl_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="ttl must not be negative"):
        PodListCache(Source(), ttl=-1)


# --- with the unix attestor, on a real process ---------------------------------------------------------


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    sleep = shutil.which("sleep")
    assert sleep is not None
    process = subprocess.Popen([sleep, "60"])  # noqa: S603
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def mirror(proc: Path, process: subprocess.Popen[bytes], cgroup: bytes) -> Caller:
    """``proc/<pid>`` for a real process: its real stat, a cgroup file of a pod's container."""
    directory = proc / str(process.pid)
    directory.mkdir()
    (directory / "stat").write_bytes(Path(f"/proc/{process.pid}/stat").read_bytes())
    (directory / "cgroup").write_bytes(cgroup)
    return Caller(pid=process.pid, uid=os.getuid(), gid=os.getgid(), start_time=read_stat(process.pid).start_time)


async def test_unix_and_k8s_selectors_together(
    kubelet: FakeKubelet, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    caller = mirror(tmp_path, sleeper, cgroup_of(API_UID, API))
    combined = CombinedAttestor((UnixAttestor(), attestor_for(kubelet, tmp_path)))
    assert combined.name == "unix+k8s"
    selectors = await combined.attest(caller)
    assert selectors >= API_SELECTORS
    assert {f"unix:uid:{os.getuid()}", f"unix:gid:{os.getgid()}"} <= selectors
    assert selectors - API_SELECTORS == await UnixAttestor().attest(caller)


async def test_a_k8s_failure_fails_the_combined_attestation(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    caller = mirror(tmp_path, sleeper, cgroup_of(API_UID, API))
    k8s = K8sAttestor(K8sAttestorConfig(pods_url=f"http://127.0.0.1:{closed_port()}/pods", proc_root=tmp_path))
    message = await refusal(CombinedAttestor((UnixAttestor(), k8s)), caller)
    assert message.startswith("workload: k8s: cannot list the pods of this node from ")


def test_a_combined_attestor_needs_an_attestor() -> None:
    with pytest.raises(ValueError, match="at least one"):
        CombinedAttestor(())


# --- configuration ---------------------------------------------------------------------------------------


def load(text: str) -> AgentConfig:
    return parse_config("trust_domain: example.org\n" + text, AgentConfig, source="agent.yaml")


def test_off_by_default_and_the_defaults() -> None:
    section = load("").workload_attestors.k8s
    assert section == K8sAttestorSection()
    assert section.enabled is False
    assert section.attestor_config() == K8sAttestorConfig(
        pods_url="http://127.0.0.1:10255/pods",
        node_name=None,
        proc_root=Path("/proc"),
        max_poll_attempts=20,
        poll_interval=0.5,
        cache_ttl=1.0,
    )


def test_every_key_is_read() -> None:
    section = load(
        "workload_attestors:\n"
        "  k8s:\n"
        "    enabled: true\n"
        "    pods_url: http://10.0.0.11:10255/pods\n"
        "    node_name: node-1\n"
        "    proc_root: /host/proc\n"
        "    max_poll_attempts: 60\n"
        "    poll_interval: 250ms\n"
        "    cache_ttl: 2\n"
    ).workload_attestors.k8s
    assert section.enabled is True
    assert section.attestor_config() == K8sAttestorConfig(
        pods_url="http://10.0.0.11:10255/pods",
        node_name="node-1",
        proc_root=Path("/host/proc"),
        max_poll_attempts=60,
        poll_interval=0.25,
        cache_ttl=2.0,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "  k8s:\n    pod_url: x\n",
            'config: agent.yaml:4: unknown key "pod_url" in "workload_attestors.k8s" (known: enabled, pods_url, '
            "node_name, proc_root, max_poll_attempts, poll_interval, cache_ttl)",
        ),
        (
            "  k8s:\n    pods_url: https://127.0.0.1:10250/pods\n",
            "config: agent.yaml:4: workload_attestors.k8s: pods_url must be an http:// URL (the kubelet's read-only "
            'port): "https://127.0.0.1:10250/pods"',
        ),
        (
            "  k8s:\n    max_poll_attempts: 0\n",
            "config: agent.yaml:4: workload_attestors.k8s: max_poll_attempts must be at least 1, not 0",
        ),
        (
            '  k8s:\n    node_name: ""\n',
            "config: agent.yaml:4: workload_attestors.k8s: node_name must not be empty (null: do not check the pods' "
            "node)",
        ),
        (
            "  k8s:\n    enabled: yes\n",
            "config: agent.yaml:4: workload_attestors.k8s.enabled: expected a boolean (true or false), got string "
            '"yes"',
        ),
    ],
)
def test_mistakes_are_named_with_their_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load("workload_attestors:\n" + text)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("configured", "environ", "expected"),
    [
        ("node-1", {"NODE_NAME": "node-2"}, "node-1"),
        (None, {"NODE_NAME": "node-2"}, "node-2"),
        (None, {"NODE_NAME": ""}, None),
        (None, {}, None),
    ],
)
def test_the_node_name_comes_from_the_config_then_the_environment(
    configured: str | None, environ: dict[str, str], expected: str | None
) -> None:
    assert node_name_from(configured, environ) == expected


def test_the_agent_runs_unix_alone_or_unix_then_k8s() -> None:
    assert isinstance(workload_attestor(load("").workload_attestors, {}), UnixAttestor)
    enabled = load("workload_attestors:\n  k8s:\n    enabled: true\n").workload_attestors
    combined = workload_attestor(enabled, {"NODE_NAME": "node-7"})
    assert isinstance(combined, CombinedAttestor)
    unix, k8s = combined.attestors
    assert isinstance(unix, UnixAttestor)
    assert isinstance(k8s, K8sAttestor)
    assert k8s.config.node_name == "node-7"
