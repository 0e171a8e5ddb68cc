"""The agent's side of k8s_psat: agent.yaml's section, the run flags, the settings, reading the token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.agent.app import Agent
from sidecar.agent.config import DEFAULT_PSAT_TOKEN_PATH, AgentConfig, K8sPsatSection
from sidecar.agent.node import MAX_PSAT_TOKEN_BYTES, NodeError, NodeSettings, read_psat_token
from sidecar.agent.serverapi import K8S_PSAT, k8s_psat_payload
from sidecar.cli import build_parser, load_agent_config
from spiffecore import TrustDomain
from spiffeops.config import ConfigError, parse_config

BASE = "trust_domain: example.org\n"


def load(text: str) -> AgentConfig:
    return parse_config(BASE + text, AgentConfig, source="agent.yaml")


def test_the_section_with_its_default_token_path() -> None:
    config = load("k8s_psat:\n  cluster: prod\n")
    assert config.k8s_psat == K8sPsatSection(cluster="prod", token_path=Path("/var/run/secrets/tokens/spiffe-agent"))
    assert load("").k8s_psat is None
    settings = Agent(config).settings()
    assert (settings.k8s_psat_cluster, settings.k8s_psat_token_path) == ("prod", DEFAULT_PSAT_TOKEN_PATH)
    assert settings.can_reattest
    assert settings.attestation_type == K8S_PSAT


def test_the_token_path_is_read_from_the_file() -> None:
    config = load("k8s_psat:\n  cluster: prod\n  token_path: /run/psat/token\n")
    assert Agent(config).settings().k8s_psat_token_path == Path("/run/psat/token")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "k8s_psat:\n  cluster: prod\njoin_token: abcdefghijklmnop\n",
            "config: agent.yaml:1: k8s_psat excludes join_token and x509pop: choose one node attestor",
        ),
        (
            "k8s_psat: {cluster: prod}\nx509pop: {cert: c.pem, key: k.pem}\n",
            "config: agent.yaml:1: k8s_psat excludes join_token and x509pop: choose one node attestor",
        ),
        ("k8s_psat:\n  token_path: /t\n", 'config: agent.yaml:3: missing required key "cluster" in "k8s_psat"'),
        ("k8s_psat:\n  cluster: ''\n", "config: agent.yaml:3: k8s_psat: k8s_psat.cluster must not be empty"),
        (
            "k8s_psat:\n  cluster: prod\n  token: x\n",
            'config: agent.yaml:4: unknown key "token" in "k8s_psat" (known: cluster, token_path)',
        ),
    ],
)
def test_mistakes_are_named_with_their_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(text)
    assert str(caught.value) == message


def test_run_flags_set_the_section(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["run", "--trust-domain", "example.org", "--k8s-psat-cluster", "edge", "--k8s-psat-token-path", "/t/psat"]
    )
    assert load_agent_config(args).k8s_psat == K8sPsatSection(cluster="edge", token_path=Path("/t/psat"))
    config = tmp_path / "agent.yaml"
    config.write_text(BASE + "k8s_psat:\n  cluster: prod\n  token_path: /from/file\n")
    args = parser.parse_args(["run", "--config", str(config), "--k8s-psat-cluster", "edge"])
    assert load_agent_config(args).k8s_psat == K8sPsatSection(cluster="edge", token_path=Path("/from/file"))
    only_path = parser.parse_args(["run", "--trust-domain", "example.org", "--k8s-psat-token-path", "/t"])
    with pytest.raises(ConfigError, match='missing required key "cluster" in "k8s_psat"'):
        load_agent_config(only_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k8s_psat_cluster": "prod", "join_token": "t"}, "node: k8s_psat excludes join_token and x509pop; set one"),
        (
            {"k8s_psat_cluster": "prod", "x509pop_cert": Path("c"), "x509pop_key": Path("k")},
            "node: k8s_psat excludes join_token and x509pop; set one",
        ),
        ({"k8s_psat_cluster": ""}, "node: k8s_psat_cluster must not be empty"),
    ],
)
def test_settings_refuse_contradictions(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        NodeSettings(
            server_address="127.0.0.1:1",
            trust_domain=TrustDomain.parse("example.org"),
            data_dir=Path("d"),
            **options,  # type: ignore[arg-type]
        )


def test_the_payload_is_the_servers_json() -> None:
    assert json.loads(k8s_psat_payload("prod", "a.b.c")) == {"cluster": "prod", "token": "a.b.c"}


def test_the_token_is_read_afresh_and_trimmed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n")
    assert read_psat_token(path) == "eyJhbGciOiJSUzI1NiJ9.e30.c2ln"
    path.write_text("eyJ.rotated.sig")
    assert read_psat_token(path) == "eyJ.rotated.sig"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "node: cannot read the k8s_psat token (No such file or directory)"),
        (b"", "node: the k8s_psat token file is empty"),
        (b" \n", "node: the k8s_psat token file is empty"),
        (b"secret part\n", "node: the k8s_psat token file does not hold a token (a JWT is printable ASCII)"),
        (b"secr\xc3\xa9t", "node: the k8s_psat token file does not hold a token (a JWT is printable ASCII)"),
        (
            b"x" * (MAX_PSAT_TOKEN_BYTES + 1),
            f"node: the k8s_psat token file is larger than {MAX_PSAT_TOKEN_BYTES} bytes",
        ),
    ],
)
def test_unusable_token_files_are_named_and_never_quoted(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(NodeError) as caught:
        read_psat_token(path)
    assert str(caught.value) == f'{message}: "{path}"'
    assert "secr" not in str(caught.value)
