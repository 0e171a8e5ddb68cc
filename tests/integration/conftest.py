"""Fixtures of the integration tests: real spiffe-server processes, the node CA, PostgreSQL.

PostgreSQL comes from the store tests' fixture (``SPIFFE_TEST_POSTGRES_URL``; unreachable means a
failure that says so, never a skip).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.controlplane.store.conftest import postgres_server
from tests.support.ca import TestCA
from tests.support.server import ServerProcess, running_server

__all__ = ["node_ca", "postgres_server", "server"]


@pytest.fixture(scope="session")
def node_ca() -> TestCA:
    """The root of the node certificates the shared server's x509pop attestor trusts."""
    return TestCA.create("nodes.example")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, node_ca: TestCA) -> Iterator[ServerProcess]:
    """One server per test module (SQLite), with join_token and x509pop (trusting ``node_ca``)."""
    directory = tmp_path_factory.mktemp("server")
    ca_bundle = directory / "nodes.pem"
    ca_bundle.write_bytes(node_ca.x509_bundle().pem())
    config = directory / "server.yaml"
    config.write_text(f"trust_domain: example.org\nattestors:\n  x509pop:\n    ca_bundle: {ca_bundle}\n")
    with running_server(directory / "data", config=config) as process:
        yield process
