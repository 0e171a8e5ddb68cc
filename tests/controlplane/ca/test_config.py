"""The CA configuration: SPIRE's defaults, and a bad configuration refused when it is built."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from controlplane.ca.config import CAConfig
from controlplane.ca.errors import CAConfigError
from controlplane.ca.keys import KeyType
from tests.controlplane.ca.conftest import TD


def test_defaults_are_spires() -> None:
    config = CAConfig(trust_domain=TD)
    assert config.key_type is KeyType.EC_P256
    assert config.jwt_key_type is KeyType.EC_P256
    assert config.ca_ttl == timedelta(hours=24)
    assert config.x509_svid_ttl == timedelta(hours=1)
    assert config.jwt_svid_ttl == timedelta(minutes=5)
    assert config.agent_svid_ttl == timedelta(hours=1)
    assert config.upstream_paths is None


def test_key_types_given_as_names_are_parsed() -> None:
    config = CAConfig(trust_domain=TD, key_type="rsa-2048", jwt_key_type="ec-p384")  # type: ignore[arg-type]
    assert (config.key_type, config.jwt_key_type) == (KeyType.RSA_2048, KeyType.EC_P384)
    with pytest.raises(CAConfigError, match=r'^ca: key type must be one of ec-p256, ec-p384, rsa-2048: "ed25519"$'):
        CAConfig(trust_domain=TD, jwt_key_type="ed25519")  # type: ignore[arg-type]


def test_svid_ttls_that_could_be_cut_short_are_an_error() -> None:
    with pytest.raises(CAConfigError) as info:
        CAConfig(trust_domain=TD, ca_ttl=timedelta(hours=2))
    assert str(info.value).startswith("ca: x509_svid_ttl 1h is too long for ca_ttl 2h: ")
    assert "agent_svid_ttl 1h is too long for ca_ttl 2h" in str(info.value)
    assert "jwt_svid_ttl" not in str(info.value)


def test_upstream_paths_come_together(tmp_path: Path) -> None:
    config = CAConfig(trust_domain=TD, upstream_cert_path=tmp_path / "c", upstream_key_path=tmp_path / "k")
    assert config.upstream_paths == (tmp_path / "c", tmp_path / "k")
    with pytest.raises(CAConfigError) as info:
        CAConfig(trust_domain=TD, upstream_cert_path=tmp_path / "c")
    assert str(info.value) == "ca: upstream_cert_path and upstream_key_path must be set together"


def test_trust_domain_must_be_parsed() -> None:
    with pytest.raises(CAConfigError) as info:
        CAConfig(trust_domain="example.org")  # type: ignore[arg-type]
    assert str(info.value) == 'ca: trust_domain must be a TrustDomain: "example.org"'
