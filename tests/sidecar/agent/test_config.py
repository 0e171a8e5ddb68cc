"""agent.yaml's ``sds:`` section: loading, the mapping to the SDS server's settings, and a real agent using it.

The loader and mapping tests read YAML text; the last test runs ``spiffe-agent run --config`` as a
process against a real server and asks its socket for secrets with raw SDS gRPC requests (this
test process is the workload, selected by its uid), so the names and the validation context the
agent serves are what the file said.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2  # type: ignore[import-untyped]
from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped]
from envoy.service.secret.v3 import sds_pb2_grpc  # type: ignore[import-untyped]

from sidecar.agent.app import sds_config
from sidecar.agent.config import AgentConfig, SDSSection
from sidecar.sds.resources import SECRET_TYPE_URL, SPIFFE_VALIDATOR, SDSConfig
from spiffeops.config import ConfigError, parse_config
from tests.support.agent import AgentProcess, remove_socket_dir, running_agent, socket_dir, write_roots
from tests.support.server import ServerProcess

BASE = "trust_domain: example.org\n"


def load(text: str) -> AgentConfig:
    return parse_config(BASE + text, AgentConfig, source="agent.yaml")


# --- loading -------------------------------------------------------------------------------------------


def test_defaults_are_spire_and_istio_names() -> None:
    assert load("").sds == SDSSection()
    assert sds_config(load("").sds) == SDSConfig()
    assert sds_config(SDSSection()) == SDSConfig(
        default_svid_name="default", root_ca_name="ROOTCA", all_bundles_name="ALL", disable_spiffe_validation=False
    )


def test_every_key_is_read_and_mapped() -> None:
    config = load(
        "sds:\n"
        "  default_svid_name: svid\n"
        "  root_ca_name: bundle\n"
        "  all_bundles_name: federated\n"
        "  disable_spiffe_cert_validation: true\n"
    )
    assert sds_config(config.sds) == SDSConfig(
        default_svid_name="svid", root_ca_name="bundle", all_bundles_name="federated", disable_spiffe_validation=True
    )


def test_null_disables_a_name_istio_federation() -> None:
    config = load("sds:\n  root_ca_name: null\n  all_bundles_name: ROOTCA\n")
    assert sds_config(config.sds) == SDSConfig(root_ca_name=None, all_bundles_name="ROOTCA")


def test_an_empty_section_means_the_defaults() -> None:
    assert load("sds:\n").sds == SDSSection()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "sds:\n  root_ca: x\n",
            'config: agent.yaml:3: unknown key "root_ca" in "sds" (known: default_svid_name, root_ca_name, '
            "all_bundles_name, disable_spiffe_cert_validation)",
        ),
        (
            "sds:\n  disable_spiffe_cert_validation: yes\n",
            "config: agent.yaml:3: sds.disable_spiffe_cert_validation: expected a boolean (true or false), "
            'got string "yes"',
        ),
        (
            "sds:\n  default_svid_name: 7\n",
            "config: agent.yaml:3: sds.default_svid_name: expected a string or null, got integer 7",
        ),
        (
            "sds:\n  default_svid_name: ROOTCA\n",
            "config: agent.yaml:3: sds: sds resource names must differ from each other: ['ROOTCA', 'ROOTCA', 'ALL']",
        ),
        (
            'sds:\n  all_bundles_name: ""\n',
            "config: agent.yaml:3: sds: sds resource name must be non-empty, not '*' and not a SPIFFE ID: ''",
        ),
        (
            "sds:\n  default_svid_name: spiffe://example.org/web\n",
            "config: agent.yaml:3: sds: sds resource name must be non-empty, not '*' and not a SPIFFE ID: "
            "'spiffe://example.org/web'",
        ),
        (
            'sds:\n  root_ca_name: "*"\n',
            "config: agent.yaml:3: sds: sds resource name must be non-empty, not '*' and not a SPIFFE ID: '*'",
        ),
        ("sds: [default]\n", "config: agent.yaml:2: sds: expected a mapping, got a list"),
    ],
)
def test_mistakes_are_named_with_their_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(text)
    assert str(caught.value) == message


# --- a real agent with an sds: section -------------------------------------------------------------------

AGENT_YAML = """\
sds:
  default_svid_name: my-svid
  root_ca_name: my-roots
  all_bundles_name: null
  disable_spiffe_cert_validation: true
"""


@pytest.fixture
def configured_agent(server: ServerProcess, tmp_path: Path) -> Iterator[AgentProcess]:
    node = f"spiffe://example.org/node/sds-config-{os.getpid()}"
    token = server.token("--spiffe-id", node)
    server.cli(
        "entry", "create", "--spiffe-id", "spiffe://example.org/sds-config", "--parent-id", node,
        "--selector", f"unix:uid:{os.getuid()}",
    )  # fmt: skip
    config = tmp_path / "agent.yaml"
    config.write_text(AGENT_YAML)
    sockets = socket_dir("sds-config")
    try:
        with running_agent(
            tmp_path / "agent",
            server.address,
            socket_path=sockets / "api.sock",
            join_token=token,
            trust_bundle=write_roots(server, tmp_path / "roots.pem"),
            extra=["--config", str(config)],
        ) as agent:
            yield agent
    finally:
        remove_socket_dir(sockets)


async def fetch(agent: AgentProcess, *names: str) -> dict[str, Any]:
    """One ``StreamSecrets`` request for ``names``; the first response's secrets by name."""
    async with grpc.aio.insecure_channel(f"unix:{agent.socket}") as channel:
        call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()
        await call.write(discovery_pb2.DiscoveryRequest(resource_names=list(names), type_url=SECRET_TYPE_URL))
        response = await call.read()
        call.cancel()
    assert isinstance(response, discovery_pb2.DiscoveryResponse), response  # not grpc.aio.EOF
    secrets = {}
    for packed in response.resources:
        secret = secret_pb2.Secret()
        assert packed.Unpack(secret)
        secrets[secret.name] = secret
    return secrets


async def refused(agent: AgentProcess, name: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch(agent, name)
    return caught.value.code(), caught.value.details() or ""


async def fetch_once_issued(agent: AgentProcess, *names: str, timeout: float = 30.0) -> dict[str, Any]:
    """:func:`fetch`, asked again while the agent has not yet received the caller's entry (the
    ready line comes before the first snapshot; Envoy retries the same way)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await fetch(agent, *names)
        except grpc.aio.AioRpcError as err:
            issued_yet = err.code() is not grpc.StatusCode.PERMISSION_DENIED or "no identity issued" not in (
                err.details() or ""
            )
            if issued_yet or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


async def test_the_agent_serves_the_names_and_form_its_config_says(configured_agent: AgentProcess) -> None:
    secrets = await fetch_once_issued(configured_agent, "my-svid", "my-roots")
    assert secrets["my-svid"].tls_certificate.certificate_chain.inline_bytes.startswith(b"-----BEGIN CERTIFICATE")
    roots = secrets["my-roots"].validation_context
    assert roots.trusted_ca.inline_bytes.startswith(b"-----BEGIN CERTIFICATE")  # validator disabled: trusted_ca
    assert not roots.HasField("custom_validator_config")
    assert SPIFFE_VALIDATOR not in str(secrets["my-roots"])
    names = "['my-svid', 'my-roots']"
    for default_name in ("default", "ROOTCA", "ALL"):  # the defaults are gone, and ALL was set to null
        assert await refused(configured_agent, default_name) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            f'sds: resource name must be one of {names}, a SPIFFE ID or a trust domain ID: "{default_name}"',
        )
