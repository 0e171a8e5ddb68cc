"""The ``k8s`` workload attestor: SPIRE's Kubernetes selectors for a caller running in a pod.

How a caller is attested:

1. ``<proc_root>/<pid>/cgroup`` names the pod's UID and the container's ID
   (:mod:`~sidecar.agent.attestors.k8s_cgroup` has the layouts). It is read through one open
   ``<proc_root>/<pid>`` directory, and ``stat`` through the same directory must show the start
   time the front door recorded, so a PID reused by another process is never read in the
   caller's stead. A process in no container of a pod (a host process, the agent's own CLI) gets
   no ``k8s`` selectors and no error: the other attestors' selectors still apply.
2. The kubelet's pod list (``pods_url``, its read-only ``/pods`` endpoint) is searched for that
   container ID (:mod:`~sidecar.agent.attestors.k8s_pods` has the selectors). The container's pod
   must be the one its cgroup names.
3. A container that has just started may not be in the kubelet's list yet: the list is fetched
   anew up to ``max_poll_attempts`` times, ``poll_interval`` apart. If the container is still not
   there, the caller is attested **without** ``k8s`` selectors and a warning says so: it gets
   what its other selectors give it (often nothing, ``PermissionDenied``, which clients retry).

Failure rule: when the kubelet cannot be asked (unreachable, an error status, an answer that is
not a pod list, larger than the limit or slower than the timeout) a caller in a pod **fails**
attestation (the Workload API answers ``Unavailable``, which clients retry with backoff), as in
SPIRE. Attesting it without its ``k8s`` selectors instead could hand it a different default
identity (one of its unix-only entries) that an open stream would then keep. Callers in no pod
never need the kubelet and are not affected.

One list serves many callers: a fetched list is reused for ``cache_ttl`` seconds, and callers
arriving while a fetch is under way wait for that fetch instead of starting their own
(:class:`PodListCache`), so a burst of new workloads costs one kubelet call. A failed fetch is
remembered for ``cache_ttl`` too, so an outage costs the kubelet one call per ``cache_ttl``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sidecar.agent.attestors.base import PROC_ROOT, Caller, WorkloadAttestationError, read_proc_file, read_stat
from sidecar.agent.attestors.k8s_cgroup import PodContainer, container_of_cgroup
from sidecar.agent.attestors.k8s_kubelet import KubeletClient, KubeletError, parse_pods_url
from sidecar.agent.attestors.k8s_pods import PodList

log = logging.getLogger(__name__)

PLUGIN_NAME: Final = "k8s"
DEFAULT_PODS_URL: Final = "http://127.0.0.1:10255/pods"
DEFAULT_MAX_POLL_ATTEMPTS: Final = 20
DEFAULT_POLL_INTERVAL: Final = 0.5
DEFAULT_CACHE_TTL: Final = 1.0
NODE_NAME_ENV: Final = "NODE_NAME"
_CGROUP_LIMIT: Final = 64 << 10  # a v1 cgroup file has a dozen lines of a few hundred bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class K8sAttestorConfig:
    """The k8s attestor's options (``agent.yaml``'s ``workload_attestors.k8s``); times in seconds.

    ``node_name``, when set, is the node the kubelet's pods must be bound to: a list of another
    node's pods (``pods_url`` reaching the wrong kubelet) fails attestation instead of being used.
    """

    pods_url: str = DEFAULT_PODS_URL
    node_name: str | None = None
    proc_root: Path = PROC_ROOT
    max_poll_attempts: int = DEFAULT_MAX_POLL_ATTEMPTS
    poll_interval: float = DEFAULT_POLL_INTERVAL
    cache_ttl: float = DEFAULT_CACHE_TTL

    def __post_init__(self) -> None:
        parse_pods_url(self.pods_url)
        if self.node_name is not None and not self.node_name:
            raise ValueError("node_name must not be empty (null: do not check the pods' node)")
        if isinstance(self.max_poll_attempts, bool) or not isinstance(self.max_poll_attempts, int):
            raise TypeError(f"max_poll_attempts must be an integer, not {self.max_poll_attempts!r}")
        if self.max_poll_attempts < 1:
            raise ValueError(f"max_poll_attempts must be at least 1, not {self.max_poll_attempts}")
        if self.poll_interval < 0:
            raise ValueError(f"poll_interval must not be negative, not {self.poll_interval}")
        if self.cache_ttl < 0:
            raise ValueError(f"cache_ttl must not be negative, not {self.cache_ttl}")


def node_name_from(configured: str | None, environ: Mapping[str, str]) -> str | None:
    """The node to expect: ``configured``, else ``$NODE_NAME`` (the downward API's ``spec.nodeName``)."""
    if configured is not None:
        return configured
    return environ.get(NODE_NAME_ENV) or None


@dataclass(frozen=True, slots=True)
class _Outcome:
    generation: int
    started: float
    pods: PodList | None
    error: str | None

    def unwrap(self) -> tuple[int, PodList]:
        if self.pods is None:
            raise KubeletError(self.error)
        return self.generation, self.pods


class PodListCache:
    """The kubelet's pod list, fetched at most once per ``ttl`` seconds and never twice at once.

    :meth:`get` answers with a list fetched within ``ttl`` (or the failure of that fetch); a caller
    that has already searched a list and wants a newer one passes that list's generation as
    ``after``. Callers that need a fetch while one is under way share it. Lists carry generation
    numbers in the order their fetches started; a fetch under way is always newer than any list
    held. Use from one event loop.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[PodList]],
        *,
        ttl: float = DEFAULT_CACHE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0:
            raise ValueError(f"ttl must not be negative, not {ttl}")
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._generation = 0
        self._last: _Outcome | None = None
        self._pending: asyncio.Future[_Outcome] | None = None

    @property
    def fetches(self) -> int:
        """How many fetches have started."""
        return self._generation

    async def get(self, *, after: int = 0) -> tuple[int, PodList]:
        """A list newer than generation ``after``, with its generation; :class:`KubeletError` if it failed."""
        last = self._last
        if last is not None and last.generation > after and self._clock() - last.started < self._ttl:
            return last.unwrap()
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._run())
        # Shielded: a caller that goes away does not cancel the fetch others are waiting for.
        outcome = await asyncio.shield(self._pending)
        return outcome.unwrap()

    async def _run(self) -> _Outcome:
        self._generation += 1
        generation, started = self._generation, self._clock()
        try:
            outcome = _Outcome(generation, started, await self._fetch(), None)
        except KubeletError as err:
            outcome = _Outcome(generation, started, None, str(err))
        finally:
            self._pending = None
        self._last = outcome
        return outcome


class K8sAttestor:
    """The ``k8s`` workload attestor (see the module's documentation for how and what it attests).

    ``pods`` is where pod lists come from (by default a :class:`PodListCache` over a
    :class:`KubeletClient` for ``config.pods_url``); ``sleep`` waits between polls.
    """

    def __init__(
        self,
        config: K8sAttestorConfig | None = None,
        *,
        pods: PodListCache | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._config = config if config is not None else K8sAttestorConfig()
        if pods is None:
            client = KubeletClient(self._config.pods_url)
            pods = PodListCache(lambda: self._checked(client.pod_list()), ttl=self._config.cache_ttl)
        self._pods = pods
        self._sleep = sleep

    @property
    def name(self) -> str:
        return PLUGIN_NAME

    @property
    def config(self) -> K8sAttestorConfig:
        return self._config

    @property
    def pods(self) -> PodListCache:
        return self._pods

    async def attest(self, caller: Caller) -> frozenset[str]:
        """The caller's ``k8s`` selectors (none outside a pod), or :class:`WorkloadAttestationError`."""
        located = self.locate(caller)
        if located is None:
            return frozenset()
        attempts = self._config.max_poll_attempts
        generation = 0
        for attempt in range(1, attempts + 1):
            try:
                generation, pods = await self._pods.get(after=generation)
            except KubeletError as err:
                raise WorkloadAttestationError(f"k8s: cannot list the pods of this node from {err}") from err
            found = pods.find(located.container_id)
            if found is not None:
                pod, status = found
                if pod.uid != located.pod_uid:
                    raise WorkloadAttestationError(
                        f"k8s: the cgroup of process {caller.pid} names pod {located.pod_uid}, but the kubelet "
                        f"lists its container {located.container_id} in pod {pod.uid} ({pod.namespace}/{pod.name})"
                    )
                return pod.selectors(status)
            if attempt < attempts:
                await self._sleep(self._config.poll_interval)
        log.warning(
            "k8s attestor: the caller's container is not in the kubelet's pod list; attested without k8s selectors",
            extra={
                "pid": caller.pid,
                "pod_uid": located.pod_uid,
                "container_id": located.container_id,
                "attempts": attempts,
            },
        )
        return frozenset()

    def locate(self, caller: Caller) -> PodContainer | None:
        """The pod and container the caller's cgroup names (``None``: in none), read as the module says."""
        pid = caller.pid
        try:
            dir_fd = os.open(f"{self._config.proc_root}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as err:
            raise WorkloadAttestationError(f"process {pid} has exited") from err
        except OSError as err:
            raise WorkloadAttestationError(f"cannot open the /proc directory of process {pid}: {err.strerror}") from err
        try:
            data = read_proc_file(pid, "cgroup", dir_fd, limit=_CGROUP_LIMIT)
            # After the read: a process that exited before it cannot be read through dir_fd any more,
            # so a matching start time means the cgroup read was the caller's.
            stat = read_stat(pid, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        if stat.start_time != caller.start_time:
            raise WorkloadAttestationError(
                f"process {pid} is not the caller: it started at tick {stat.start_time}, "
                f"the caller at tick {caller.start_time} (the caller exited and its pid was reused)"
            )
        try:
            return container_of_cgroup(data)
        except ValueError as err:
            raise WorkloadAttestationError(f"k8s: malformed cgroup file of process {pid}: {err}") from err

    async def _checked(self, fetching: Awaitable[PodList]) -> PodList:
        """A fetched list, checked against ``node_name``; logged once per fetch when it fails or skips pods."""
        try:
            pods = await fetching
            expected = self._config.node_name
            others = sorted(pods.node_names - {expected}) if expected is not None else []
            if others:
                raise KubeletError(
                    f"{self._config.pods_url}: it lists pods of node {others[0]!r}, and this agent runs on node "
                    f"{expected!r} (is pods_url this node's kubelet?)"
                )
        except KubeletError as err:
            log.warning("k8s attestor: cannot list the pods of this node", extra={"reason": str(err)})
            raise
        if pods.skipped:
            log.warning(
                "k8s attestor: pods left out of the kubelet's list",
                extra={"count": len(pods.skipped), "first": pods.skipped[0]},
            )
        return pods
