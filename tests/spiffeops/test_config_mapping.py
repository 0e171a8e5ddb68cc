"""``dict[str, X]`` fields: sections keyed by names the user chooses (clusters, trust domains)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spiffeops.config import ConfigError, parse_config


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    allow: tuple[str, ...]
    jwks_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.allow:
            raise ValueError("allow must name at least one account")


@dataclass(frozen=True, slots=True, kw_only=True)
class Attestor:
    clusters: dict[str, Cluster] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    attestor: Attestor = field(default_factory=Attestor)


def test_a_mapping_of_sections_keeps_its_keys_in_order() -> None:
    text = """\
attestor:
  clusters:
    prod:
      allow: ["spiffe:agent"]
      jwks_file: /etc/jwks.json
    staging:
      allow: ["a:b", "c:d"]
  labels: {zone: eu, tier: "1"}
"""
    config = parse_config(text, Config, source="server.yaml")
    assert list(config.attestor.clusters) == ["prod", "staging"]
    assert config.attestor.clusters["prod"] == Cluster(allow=("spiffe:agent",), jwks_file=Path("/etc/jwks.json"))
    assert config.attestor.clusters["staging"].allow == ("a:b", "c:d")
    assert config.attestor.labels == {"zone": "eu", "tier": "1"}


@pytest.mark.parametrize("text", ["", "attestor:", "attestor: {clusters: }", "attestor: {clusters: {}}"])
def test_an_absent_or_empty_mapping_is_empty(text: str) -> None:
    assert parse_config(text, Config).attestor.clusters == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "attestor: {clusters: [prod]}",
            "config: server.yaml:1: attestor.clusters: expected a mapping, got a list",
        ),
        (
            "attestor:\n  clusters:\n    prod: {allow: [a:b], jwks: x}\n",
            'config: server.yaml:3: unknown key "jwks" in "attestor.clusters.prod" (known: allow, jwks_file)',
        ),
        (
            "attestor:\n  clusters:\n    prod: {}\n",
            'config: server.yaml:3: missing required key "allow" in "attestor.clusters.prod"',
        ),
        (
            "attestor:\n  clusters:\n    prod: {allow: []}\n",
            "config: server.yaml:3: attestor.clusters.prod: allow must name at least one account",
        ),
        (
            "attestor:\n  labels:\n    zone: 3\n",
            "config: server.yaml:3: attestor.labels.zone: expected a string, got integer 3",
        ),
        (
            "attestor:\n  clusters:\n    prod: {allow: [a:b]}\n    prod: {allow: [c:d]}\n",
            'config: server.yaml:4: duplicate key "prod" in "attestor.clusters" (first on line 3)',
        ),
    ],
)
def test_mapping_errors_name_the_key_and_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Config, source="server.yaml")
    assert str(caught.value) == message


def test_an_override_replaces_a_whole_mapping() -> None:
    config = parse_config(
        "attestor: {clusters: {prod: {allow: [a:b]}}}",
        Config,
        overrides={"attestor.clusters": {"dev": {"allow": ["x:y"]}}},
    )
    assert config.attestor.clusters == {"dev": Cluster(allow=("x:y",))}


@dataclass(frozen=True)
class IntKeys:
    counts: dict[int, str] = field(default_factory=dict)


def test_only_string_keys_are_supported() -> None:
    with pytest.raises(TypeError, match=r"^config: unsupported field type dict\[int, str\] for IntKeys.counts$"):
        parse_config("", IntKeys)
