"""One real spiffe-server process for this package's tests, with join_token and x509pop enabled."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.ca import TestCA
from tests.support.server import ServerProcess, running_server


@pytest.fixture(scope="session")
def node_ca() -> TestCA:
    """The CA whose node certificates the server's x509pop attestor trusts."""
    return TestCA.create("nodes.example")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, node_ca: TestCA) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("server")
    ca_bundle = directory / "nodes.pem"
    ca_bundle.write_bytes(node_ca.x509_bundle().pem())
    config = directory / "server.yaml"
    config.write_text(f"trust_domain: example.org\nattestors:\n  x509pop:\n    ca_bundle: {ca_bundle}\n")
    with running_server(directory / "data", config=config) as process:
        yield process


@pytest.fixture(scope="module")
def roots_pem(server: ServerProcess) -> bytes:
    return server.roots_pem()
