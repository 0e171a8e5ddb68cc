"""k8s_psat end to end: a real spiffe-server verifying projected tokens, real spiffe-agent processes.

One server serves the module, with two clusters: ``prod``, whose issuer keys it fetches from a
JWKS endpoint on 127.0.0.1 (an RSA issuer, ``iss`` checked), and ``edge``, whose keys are in a
file (an EC issuer, its own audience). Tokens are minted here by test issuers, written where the
kubelet would project them, and read by the agent.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import grpc
import pytest

from sidecar.agent.node import AgentNode, NodeError, NodeSettings, load_or_attest
from sidecar.agent.serverapi import K8S_PSAT, AgentAPIClient, ServerAPIError, attest, k8s_psat_payload
from spiffecore import TrustDomain
from tests.support.agent import (
    agent_argv,
    remove_socket_dir,
    run_agent_to_exit,
    running_agent,
    socket_dir,
    write_roots,
)
from tests.support.psat import ISSUER, Issuer, JWKSServer, Pod
from tests.support.server import ServerProcess, running_server

TD: Final = "spiffe://example.org"
SERVER_ID: Final = f"{TD}/spire/server"


@pytest.fixture(scope="module")
def prod_issuer() -> Issuer:
    return Issuer("rsa")


@pytest.fixture(scope="module")
def edge_issuer() -> Issuer:
    return Issuer("ec-p256")


@pytest.fixture(scope="module")
def psat_server(
    tmp_path_factory: pytest.TempPathFactory, prod_issuer: Issuer, edge_issuer: Issuer
) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("psat-server")
    edge_jwks = directory / "edge-jwks.json"
    edge_jwks.write_bytes(edge_issuer.jwks())
    with JWKSServer(prod_issuer.jwks()) as jwks:
        config = directory / "server.yaml"
        config.write_text(
            "trust_domain: example.org\n"
            "attestors:\n"
            "  k8s_psat:\n"
            "    clusters:\n"
            "      prod:\n"
            '        service_account_allow_list: ["spiffe:spiffe-agent"]\n'
            f"        jwks_url: {jwks.url}\n"
            f"        issuer: {ISSUER}\n"
            "      edge:\n"
            '        service_account_allow_list: ["spiffe:spiffe-agent"]\n'
            "        audience: [edge-spiffe]\n"
            f"        jwks_file: {edge_jwks}\n"
        )
        with running_server(directory / "data", config=config) as process:
            yield process


@pytest.fixture(scope="module")
def roots(psat_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_roots(psat_server, tmp_path_factory.mktemp("roots") / "roots.pem")


def write_token(path: Path, token: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token)
    path.chmod(0o600)
    return path


def node_settings(server: ServerProcess, data_dir: Path, roots: Path, token_path: Path, cluster: str) -> NodeSettings:
    return NodeSettings(
        server_address=server.address,
        trust_domain=TrustDomain.parse("example.org"),
        data_dir=data_dir,
        trust_bundle=roots,
        k8s_psat_cluster=cluster,
        k8s_psat_token_path=token_path,
    )


# --- a real agent --------------------------------------------------------------------------------


def test_an_agent_attests_with_its_token_and_serves_a_workload_under_a_node_alias(
    psat_server: ServerProcess, prod_issuer: Issuer, roots: Path, tmp_path: Path
) -> None:
    pod = Pod(node_name="node-a")
    token = prod_issuer.token(pod, now=datetime.now(UTC))
    token_path = write_token(tmp_path / "tokens" / "spiffe-agent", token)
    # A node alias for every agent of the prod cluster's spiffe namespace, and a workload under it.
    alias = f"{TD}/k8s/prod/agents"
    psat_server.cli_json(
        "entry", "create", "--spiffe-id", alias, "--parent-id", SERVER_ID,
        "--selector", "k8s_psat:cluster:prod", "--selector", "k8s_psat:agent_ns:spiffe",
    )  # fmt: skip
    workload = f"{TD}/k8s/prod/workload"
    psat_server.cli_json(
        "entry", "create", "--spiffe-id", workload, "--parent-id", alias, "--selector", f"unix:uid:{os.getuid()}"
    )
    sockets = socket_dir()
    try:
        with running_agent(
            tmp_path / "agent",
            psat_server.address,
            socket_path=sockets / "api.sock",
            trust_bundle=roots,
            extra=["--k8s-psat-cluster", "prod", "--k8s-psat-token-path", str(token_path)],
        ) as agent:
            agent_id = f"{TD}/spire/agent/k8s_psat/prod/{pod.node_uid}"
            assert str(agent.agent_id) == agent_id
            fetched = agent.api("fetch", "x509", "--output", "json").json()
            assert [svid["spiffe_id"] for svid in fetched["svids"]] == [workload]
            shown = psat_server.cli_json("agent", "show", agent_id)
            assert shown["attestation_type"] == "k8s_psat"
            assert shown["selectors"] == [
                "k8s_psat:agent_node_name:node-a",
                f"k8s_psat:agent_node_uid:{pod.node_uid}",
                "k8s_psat:agent_ns:spiffe",
                f"k8s_psat:agent_pod_name:{pod.name}",
                f"k8s_psat:agent_pod_uid:{pod.uid}",
                "k8s_psat:agent_sa:spiffe-agent",
                "k8s_psat:cluster:prod",
            ]
            text = psat_server.cli("agent", "show", agent_id).stdout
            assert "k8s_psat:agent_node_name:node-a" in text
            listed = psat_server.cli("agent", "list").stdout
            assert any(agent_id in line and "k8s_psat" in line for line in listed.splitlines()), listed
            logs = agent.stderr
        assert token not in logs
        assert token not in psat_server.stderr
    finally:
        remove_socket_dir(sockets)


REFUSED: Final[list[tuple[dict[str, Any], str]]] = [
    (
        {"kubernetes__io": None},
        "attest: k8s_psat token has no kubernetes.io claim: it is not a Kubernetes service account token",
    ),
    (
        {"sub": "system:serviceaccount:spiffe:default"},
        "attest: k8s_psat token subject is not its service account's (system:serviceaccount:spiffe:spiffe-agent)",
    ),
]


@pytest.mark.parametrize("case", REFUSED, ids=["not a service account token", "subject of another account"])
def test_a_refused_token_stops_the_agent_with_the_reason(
    psat_server: ServerProcess, prod_issuer: Issuer, roots: Path, tmp_path: Path, case: tuple[dict[str, Any], str]
) -> None:
    overrides, reason = case
    token = prod_issuer.token(Pod(), now=datetime.now(UTC), **overrides)
    token_path = write_token(tmp_path / "token", token)
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"trust_domain: example.org\nserver: {psat_server.address}\ntrust_bundle: {roots}\n"
        f"k8s_psat:\n  cluster: prod\n  token_path: {token_path}\n"
    )
    sockets = socket_dir()
    try:
        result = run_agent_to_exit(
            agent_argv(tmp_path / "data", trust_domain=None, config=config, socket_path=sockets / "api.sock")
        )
    finally:
        remove_socket_dir(sockets)
    assert result.returncode == 1, result.describe()
    expected = (
        f"spiffe-agent cannot start: node: the server refused the k8s_psat token of {token_path} for cluster 'prod'"
        f" ({reason}"
    )
    assert expected in result.stderr, result.stderr
    assert token not in result.stderr
    assert result.stdout == ""


# --- the attestation itself, in process ------------------------------------------------------------


async def test_the_edge_cluster_reads_its_keys_from_a_file_and_wants_its_own_audience(
    psat_server: ServerProcess, edge_issuer: Issuer, prod_issuer: Issuer
) -> None:
    pod = Pod()
    now = datetime.now(UTC)
    identity = await attest(
        psat_server.address,
        roots_pem=psat_server.roots_pem(),
        attestation_type=K8S_PSAT,
        payload=k8s_psat_payload("edge", edge_issuer.token(pod, now=now, aud=["edge-spiffe"])),
    )
    assert str(identity.svid.id) == f"{TD}/spire/agent/k8s_psat/edge/{pod.node_uid}"
    assert identity.can_reattest
    refusals = {
        'attest: k8s_psat token audience is not one this server accepts (accepted: edge-spiffe): "spiffe-server"': (
            "edge",
            edge_issuer.token(pod, now=now),
        ),
        # the prod issuer's key is not the edge cluster's: the clusters are apart
        f"attest: k8s_psat token key ID is not among the issuer keys of cluster 'edge': \"{prod_issuer.current}\"": (
            "edge",
            prod_issuer.token(pod, now=now, aud=["edge-spiffe"]),
        ),
        "attest: k8s_psat token has expired": ("prod", prod_issuer.token(pod, now=now - timedelta(hours=1))),
        'attest: k8s_psat cluster is not one this server attests agents of: "staging"': (
            "staging",
            prod_issuer.token(pod, now=now),
        ),
    }
    for message, (cluster, token) in refusals.items():
        with pytest.raises(ServerAPIError) as caught:
            await attest(
                psat_server.address,
                roots_pem=psat_server.roots_pem(),
                attestation_type=K8S_PSAT,
                payload=k8s_psat_payload(cluster, token),
            )
        assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.message.startswith(message), caught.value.message
        assert token not in caught.value.message


async def test_attesting_again_reads_the_rotated_token_and_supersedes_the_old_svid(
    psat_server: ServerProcess, prod_issuer: Issuer, roots: Path, tmp_path: Path
) -> None:
    """The agent pod was replaced on its node (new pod, same node uid): the node's agent is the new one."""
    first_pod = Pod()
    token_path = write_token(tmp_path / "token", prod_issuer.token(first_pod, now=datetime.now(UTC)))
    settings = node_settings(psat_server, tmp_path / "agent", roots, token_path, "prod")
    identity = await load_or_attest(settings)
    agent_id = str(identity.svid.id)
    assert agent_id == f"{TD}/spire/agent/k8s_psat/prod/{first_pod.node_uid}"

    second_pod = Pod(name="spiffe-agent-new", node_uid=first_pod.node_uid)
    write_token(token_path, prod_issuer.token(second_pod, now=datetime.now(UTC)))
    replacement = await load_or_attest(node_settings(psat_server, tmp_path / "agent-2", roots, token_path, "prod"))
    assert str(replacement.svid.id) == agent_id
    shown = await psat_server.acli_json("agent", "show", agent_id)
    assert f"k8s_psat:agent_pod_name:{second_pod.name}" in shown["selectors"]

    # The first agent's SVID is superseded; it attests again by itself, reading the token file anew.
    write_token(token_path, prod_issuer.token(first_pod, now=datetime.now(UTC)))
    svid = identity.svid
    due = svid.issued_at + (svid.expires_at - svid.issued_at) * 0.7
    node = AgentNode(settings, identity, clock=lambda: due)
    async with AgentAPIClient(identity, psat_server.address) as client:
        again = await asyncio.wait_for(node.maintain(client), 20)
    assert str(again.svid.id) == agent_id
    assert again.svid.leaf.serial_number != svid.leaf.serial_number
    shown = await psat_server.acli_json("agent", "show", agent_id)
    assert f"k8s_psat:agent_pod_name:{first_pod.name}" in shown["selectors"]
    async with AgentAPIClient(replacement, psat_server.address) as displaced:
        with pytest.raises(ServerAPIError, match="superseded"):
            await displaced.get_bundle()


async def test_a_token_file_the_agent_cannot_read_is_named(
    psat_server: ServerProcess, roots: Path, tmp_path: Path
) -> None:
    settings = node_settings(psat_server, tmp_path / "agent", roots, tmp_path / "absent", "prod")
    with pytest.raises(NodeError) as caught:
        await load_or_attest(settings)
    assert (
        str(caught.value)
        == f'node: cannot read the k8s_psat token (No such file or directory): "{tmp_path / "absent"}"'
    )
