"""server.yaml's ``attestors.k8s_psat`` section: clusters, their keys' source, and every mistake named."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.app import _attestors
from controlplane.attest.jwks import JWKSError
from controlplane.config import K8sPsatClusterSection, ServerConfig
from spiffeops.config import ConfigError, parse_config
from tests.support.psat import Issuer

BASE = "trust_domain: example.org\nattestors:\n  k8s_psat:\n    clusters:\n"


def load(clusters: str) -> ServerConfig:
    return parse_config(BASE + clusters, ServerConfig, source="server.yaml")


def test_clusters_with_a_file_or_a_url() -> None:
    config = load(
        "      prod-eu:\n"
        '        service_account_allow_list: ["spiffe:spiffe-agent"]\n'
        "        jwks_file: /etc/spiffe/prod-jwks.json\n"
        "      edge:\n"
        '        service_account_allow_list: ["kube-system:agent", "spiffe:agent"]\n'
        "        audience: [edge-server, spiffe-server]\n"
        "        jwks_url: https://kubernetes.default.svc/openid/v1/jwks\n"
        "        jwks_ca_file: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt\n"
        "        jwks_token_file: /var/run/secrets/kubernetes.io/serviceaccount/token\n"
        "        issuer: https://kubernetes.default.svc.cluster.local\n"
    )
    clusters = config.attestors.k8s_psat.clusters
    assert clusters["prod-eu"] == K8sPsatClusterSection(
        service_account_allow_list=("spiffe:spiffe-agent",),
        audience=("spiffe-server",),
        jwks_file=Path("/etc/spiffe/prod-jwks.json"),
    )
    assert clusters["edge"].audience == ("edge-server", "spiffe-server")
    assert clusters["edge"].jwks_token_file == Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    assert clusters["edge"].issuer == "https://kubernetes.default.svc.cluster.local"


def test_without_clusters_k8s_psat_is_off(tmp_path: Path) -> None:
    config = parse_config("trust_domain: example.org\n", ServerConfig)
    assert config.attestors.k8s_psat.clusters == {}
    assert "k8s_psat" not in _attestors(config, store=None)  # type: ignore[arg-type]  # join_token keeps the store


GOOD = '        service_account_allow_list: ["spiffe:agent"]\n        jwks_file: /j.json\n'


@pytest.mark.parametrize(
    ("clusters", "message"),
    [
        (
            '      prod:\n        service_account_allow_list: ["spiffe:agent"]\n',
            "config: server.yaml:6: attestors.k8s_psat.clusters.prod: set exactly one of jwks_file and jwks_url",
        ),
        (
            f"      prod:\n{GOOD}        jwks_url: https://issuer.example/jwks\n",
            "config: server.yaml:6: attestors.k8s_psat.clusters.prod: set exactly one of jwks_file and jwks_url",
        ),
        (
            '      prod:\n        service_account_allow_list: ["spiffe:agent"]\n'
            "        jwks_url: http://issuer.example/jwks\n",
            "config: server.yaml:6: attestors.k8s_psat.clusters.prod: jwks_url must use https (plain http only to a"
            " loopback address): 'http://issuer.example/jwks'",
        ),
        (
            f"      prod:\n{GOOD}        jwks_token_file: /t\n",
            "config: server.yaml:6: attestors.k8s_psat.clusters.prod: jwks_ca_file and jwks_token_file go with"
            " jwks_url",
        ),
        (
            "      prod:\n        jwks_file: /j.json\n",
            'config: server.yaml:6: missing required key "service_account_allow_list" in'
            ' "attestors.k8s_psat.clusters.prod"',
        ),
        (
            "      prod:\n        service_account_allow_list: []\n        jwks_file: /j.json\n",
            "config: server.yaml:6: attestors.k8s_psat.clusters.prod: service_account_allow_list must name at least"
            " one NAMESPACE:SERVICE_ACCOUNT",
        ),
        (
            '      prod:\n        service_account_allow_list: ["spiffe-agent"]\n        jwks_file: /j.json\n',
            "config: server.yaml:6: attestors.k8s_psat.clusters.prod: service_account_allow_list entries must be"
            " NAMESPACE:SERVICE_ACCOUNT: 'spiffe-agent'",
        ),
        (
            f"      prod:\n{GOOD}        audience: []\n",
            "config: server.yaml:6: attestors.k8s_psat.clusters.prod: audience must hold at least one non-empty"
            " audience",
        ),
        (
            f"      prod:\n{GOOD}        issuer: ''\n",
            "config: server.yaml:6: attestors.k8s_psat.clusters.prod: issuer must not be empty (leave it out to"
            " accept any)",
        ),
        (
            f"      prod/eu:\n{GOOD}",
            "config: server.yaml:4: attestors.k8s_psat: k8s_psat cluster name must be 1 to 128 letters, digits,"
            " '.', '_' or '-' (it becomes part of agent IDs): 'prod/eu'",
        ),
        (
            f"      prod:\n{GOOD}        jwks: x\n",
            'config: server.yaml:8: unknown key "jwks" in "attestors.k8s_psat.clusters.prod" (known:'
            " service_account_allow_list, audience, jwks_file, jwks_url, jwks_ca_file, jwks_token_file, issuer)",
        ),
        (
            "      - prod\n",
            "config: server.yaml:5: attestors.k8s_psat.clusters: expected a mapping, got a list",
        ),
    ],
)
def test_mistakes_are_named_with_their_line(clusters: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(clusters)
    assert str(caught.value) == message


def test_a_jwks_file_is_read_at_start_up(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    config = load(f'      prod:\n        service_account_allow_list: ["spiffe:agent"]\n        jwks_file: {jwks}\n')
    with pytest.raises(JWKSError, match="cannot read the JWK Set file"):
        _attestors(config, store=None)  # type: ignore[arg-type]
    jwks.write_bytes(Issuer("ec-p256").jwks())
    assert _attestors(config, store=None)["k8s_psat"].name == "k8s_psat"  # type: ignore[arg-type]
