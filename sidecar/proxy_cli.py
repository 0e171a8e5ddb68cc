"""The ``spiffe-proxy`` console script: :mod:`sidecar.proxy.cli` with the Workload API plugged in.

The proxy package may not import gRPC (an import-linter contract keeps it to spiffecore and an
X.509 source interface), so the Workload API client is joined to it here, one level up.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sidecar.proxy import cli
from sidecar.proxy.errors import ProxyConfigError
from sidecar.workload.client import WorkloadAPIClient
from sidecar.workload.endpoint import EndpointError
from sidecar.workload.source import X509Source


@asynccontextmanager
async def workload_source(address: str | None) -> AsyncIterator[X509Source]:
    """A started :class:`X509Source` over the Workload API at ``address`` (None: ``SPIFFE_ENDPOINT_SOCKET``)."""
    try:
        client = WorkloadAPIClient(address)
    except EndpointError as err:
        raise ProxyConfigError(f"bad --workload-api address ({err})") from err
    async with client, X509Source(client.watch_x509_context) as source:
        yield source


WORKER_COMMAND = (sys.executable, "-m", "sidecar.proxy_cli")
"""How ``--workers`` starts each worker: this module in a new interpreter."""


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, open_workload_source=workload_source, worker_command=WORKER_COMMAND)


if __name__ == "__main__":
    sys.exit(main())
