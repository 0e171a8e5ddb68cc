"""Istio's proxies on the agent: one more public socket, at Istio's path, with Istio's SDS names.

Istio's pilot-agent looks for a workload identity SDS server at
``/var/run/secrets/workload-spiffe-uds/socket`` (the file name is its
``WORKLOAD_IDENTITY_SOCKET_FILE``). When a gRPC connection there succeeds, it leaves workload
certificates to that server and its Envoy (istio-proxy) asks it, over the static cluster
``sds-grpc``, for two secrets: ``default`` (its own certificate) and ``ROOTCA`` (what it verifies
peers with). With federation Istio needs ``ROOTCA`` to carry every trust domain's roots, so on
this socket ``ROOTCA`` is the caller's own bundle *and* every federated one it may see, sent as
Envoy's SPIFFE certificate validator (each peer checked against its own domain's roots only),
and there is no separate name for the own bundle (:data:`ISTIO_SDS`).

Why a second socket instead of other names on the main one: on the main socket ``ROOTCA`` means
the own trust domain's bundle (SPIRE's meaning, relied on by the Envoy templates and by anyone
who configured ``sds:``); one socket cannot give one name two meanings. The second socket has its
own front door (callers attested by ``SO_PEERCRED`` exactly as on the main one) and its own
private gRPC server, serving the Workload API too (a workload in an Istio pod may use it) and SDS
with Istio's names, both over the agent's one cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

import grpc

from sidecar.agent.peer import FrontDoor, grpc_backend_address
from sidecar.sds.resources import SDSConfig

ISTIO_SDS: Final = SDSConfig(default_svid_name="default", root_ca_name=None, all_bundles_name="ROOTCA")
"""Istio's names: ``default`` = the caller's first SVID; ``ROOTCA`` = all its bundles, federated
ones included, as the SPIFFE validator (SPIRE's ``default_bundle_name = "null"``,
``default_all_bundles_name = "ROOTCA"``). The validator is never disabled here: a ``trusted_ca``
holds one trust domain's roots, and every Istio release that supports an external SDS server
runs an Envoy that has the validator."""

SHUTDOWN_GRACE: Final = 5.0
MAX_PENDING_REQUESTS: Final = 100_000  # as on the main socket: many workloads hold streams open

Register = Callable[[grpc.aio.Server, FrontDoor], None]

log = logging.getLogger("spiffe-agent")


@contextlib.asynccontextmanager
async def serving(path: Path, register: Register) -> AsyncIterator[FrontDoor]:
    """Serve a second public socket at ``path`` while the block runs.

    ``register(server, front_door)`` adds the servicers to a new private gRPC server; they map
    each call to its caller with ``front_door.caller_of``. The socket's directory is created (0755,
    like the main socket's) if missing. On exit the socket closes first, then the server stops,
    letting calls in flight finish for up to :data:`SHUTDOWN_GRACE` seconds.
    """
    backend = grpc_backend_address("spiffe-agent-istio")
    server = grpc.aio.server(options=[("grpc.max_pending_requests", MAX_PENDING_REQUESTS)])
    front_door = FrontDoor(path, backend)
    register(server, front_door)
    server.add_insecure_port(backend)
    await server.start()
    try:
        async with front_door:
            log.info("istio socket open", extra={"socket": str(path)})
            yield front_door
        await server.stop(SHUTDOWN_GRACE)
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await server.stop(None)
