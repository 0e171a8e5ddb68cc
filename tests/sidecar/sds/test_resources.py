"""SDS resource names, Secret messages, validation contexts and the node's say in them."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2  # type: ignore[import-untyped]
from envoy.extensions.transport_sockets.tls.v3 import (  # type: ignore[import-untyped]
    tls_spiffe_validator_config_pb2,
)
from google.protobuf import struct_pb2

from sidecar.sds.resources import (
    SPIFFE_VALIDATOR,
    BadResourceNameError,
    NodeInfo,
    NoIdentityError,
    NotAuthorizedError,
    Resolved,
    SDSConfig,
    SDSError,
    ValidatorRequiredError,
    node_info,
    resolve,
    spiffe_validator_enabled,
)
from sidecar.workload.identities import X509Context
from spiffecore import TrustDomain
from tests.sidecar.workload.support import SELECTORS, FakeIdentities
from tests.support.ca import TestCA

CONFIG = SDSConfig()
WEB = "spiffe://example.org/web"
WEB_EXT = "spiffe://example.org/web-ext"


@pytest.fixture
def identities() -> FakeIdentities:
    fake = FakeIdentities(
        TestCA.create("example.org"),
        {
            TrustDomain.parse("partner.org"): TestCA.create("partner.org"),
            TrustDomain.parse("other.org"): TestCA.create("other.org"),
        },
    )
    fake.add_entry("/web", hint="internal")
    fake.add_entry("/web-ext", hint="external", federates_with=("partner.org",))
    fake.add_entry("/db", selectors=frozenset({"unix:uid:2000"}), federates_with=("other.org",))  # not the caller's
    return fake


def context_of(identities: FakeIdentities) -> X509Context:
    context = identities.x509_context(SELECTORS)
    assert context is not None
    return context


def run(identities: FakeIdentities, *names: str, config: SDSConfig = CONFIG, spiffe_validator: bool = True) -> Resolved:
    resolved = resolve(names, context_of(identities), config, spiffe_validator=spiffe_validator)
    assert resolved is not None
    return resolved


def trust_domains(secret: Any) -> dict[str, bytes]:
    custom = secret.validation_context.custom_validator_config
    assert custom.name == SPIFFE_VALIDATOR
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    assert custom.typed_config.Unpack(config)
    return {td.name: td.trust_bundle.inline_bytes for td in config.trust_domains}


def test_default_is_the_first_svid(identities: FakeIdentities) -> None:
    secret: Any = run(identities, "default").secrets["default"]
    svid = identities.entries[0].svid
    assert secret.name == "default"
    assert secret.tls_certificate.certificate_chain.inline_bytes == svid.cert_chain_pem()
    assert secret.tls_certificate.private_key.inline_bytes == svid.private_key_pem()


def test_an_svid_by_spiffe_id(identities: FakeIdentities) -> None:
    secret: Any = run(identities, WEB_EXT).secrets[WEB_EXT]
    assert secret.name == WEB_EXT
    assert secret.tls_certificate.certificate_chain.inline_bytes == identities.entries[1].svid.cert_chain_pem()


def test_rootca_is_the_own_bundle_through_the_spiffe_validator(identities: FakeIdentities) -> None:
    secret: Any = run(identities, "ROOTCA").secrets["ROOTCA"]
    assert trust_domains(secret) == {"example.org": identities.x509_bundle.pem()}
    assert not secret.validation_context.HasField("trusted_ca")


def test_rootca_as_trusted_ca(identities: FakeIdentities) -> None:
    secret: Any = run(identities, "ROOTCA", spiffe_validator=False).secrets["ROOTCA"]
    assert secret.validation_context.trusted_ca.inline_bytes == identities.x509_bundle.pem()
    assert not secret.validation_context.HasField("custom_validator_config")


def test_all_is_own_and_federated_bundles(identities: FakeIdentities) -> None:
    secret: Any = run(identities, "ALL").secrets["ALL"]
    partner = identities.federated_cas[TrustDomain.parse("partner.org")].x509_bundle().pem()
    assert trust_domains(secret) == {"example.org": identities.x509_bundle.pem(), "partner.org": partner}
    assert list(trust_domains(secret)) == ["example.org", "partner.org"]  # other.org is /db's, not the caller's


def test_all_needs_the_spiffe_validator(identities: FakeIdentities) -> None:
    with pytest.raises(ValidatorRequiredError) as caught:
        run(identities, "ALL", spiffe_validator=False)
    assert str(caught.value) == (
        'sds: all bundles can only be sent with the SPIFFE certificate validator, which is disabled: "ALL"'
    )


@pytest.mark.parametrize("spiffe_validator", [True, False])
def test_a_bundle_by_trust_domain_id(identities: FakeIdentities, spiffe_validator: bool) -> None:
    partner = identities.federated_cas[TrustDomain.parse("partner.org")].x509_bundle().pem()
    secret: Any = run(identities, "spiffe://partner.org", spiffe_validator=spiffe_validator).secrets[
        "spiffe://partner.org"
    ]
    if spiffe_validator:
        assert trust_domains(secret) == {"partner.org": partner}
    else:
        assert secret.validation_context.trusted_ca.inline_bytes == partner


def test_everything_when_no_name_is_given(identities: FakeIdentities) -> None:
    resolved = run(identities)
    assert list(resolved.secrets) == [WEB, WEB_EXT, "spiffe://example.org", "spiffe://partner.org"]


def test_any_combination_in_one_request(identities: FakeIdentities) -> None:
    names = ("default", "ROOTCA", "ALL", WEB_EXT, "spiffe://partner.org", "spiffe://example.org", "default")
    resolved = run(identities, *names)
    assert list(resolved.secrets) == [
        "default",
        "ROOTCA",
        "ALL",
        WEB_EXT,
        "spiffe://partner.org",
        "spiffe://example.org",
    ]
    assert set(resolved.versions) == set(resolved.secrets)


@pytest.mark.parametrize(
    ("names", "error", "message"),
    [
        (
            ("spiffe://example.org/db",),
            NotAuthorizedError,
            'sds: workload is not authorized for the requested resources: "spiffe://example.org/db"',
        ),
        (
            ("default", "spiffe://example.org/db", "spiffe://other.org"),
            NotAuthorizedError,
            'sds: workload is not authorized for the requested resources: "spiffe://example.org/db, spiffe://other.org"',
        ),
        (
            ("spiffe://nowhere.example",),
            NotAuthorizedError,
            'sds: workload is not authorized for the requested resources: "spiffe://nowhere.example"',
        ),
        (
            ("rootca",),
            BadResourceNameError,
            "sds: resource name must be one of ['default', 'ROOTCA', 'ALL'], a SPIFFE ID or a trust domain ID: "
            '"rootca"',
        ),
        (
            ("spiffe://Example.org/web",),
            BadResourceNameError,
            "sds: resource name is not a valid SPIFFE ID (trust domain characters are limited to lowercase letters, "
            'numbers, dots, dashes, and underscores): "spiffe://Example.org/web"',
        ),
    ],
)
def test_refusals(identities: FakeIdentities, names: tuple[str, ...], error: type[SDSError], message: str) -> None:
    with pytest.raises(error) as caught:
        run(identities, *names)
    assert str(caught.value) == message


def test_refusal_never_carries_another_workloads_secret(identities: FakeIdentities) -> None:
    with pytest.raises(NotAuthorizedError) as caught:
        run(identities, "spiffe://example.org/db")
    db = identities.entries[2].svid
    assert db.cert_chain_pem().decode() not in str(caught.value)
    assert caught.value.value == "spiffe://example.org/db"


def test_no_identity(identities: FakeIdentities) -> None:
    with pytest.raises(NoIdentityError) as caught:
        resolve(["default"], None, CONFIG, spiffe_validator=True)
    assert str(caught.value) == "sds: no identity issued"


def test_pending_svids_wait_but_bundles_do_not() -> None:
    fake = FakeIdentities(TestCA.create("example.org"))
    fake.add_entry("/web", pending=True)
    context = context_of(fake)
    assert resolve(["default"], context, CONFIG, spiffe_validator=True) is None
    assert resolve([WEB], context, CONFIG, spiffe_validator=True) is None
    assert resolve([], context, CONFIG, spiffe_validator=True) is None
    assert resolve(["ROOTCA"], context, CONFIG, spiffe_validator=True) is not None


def test_versions_follow_content(identities: FakeIdentities) -> None:
    before = run(identities, "default", "ROOTCA").versions
    assert run(identities, "default", "ROOTCA").versions == before  # identical content, identical versions
    identities.rotate(0)
    after = run(identities, "default", "ROOTCA").versions
    assert after["default"] != before["default"]
    assert after["ROOTCA"] == before["ROOTCA"]
    assert run(identities, "ROOTCA", spiffe_validator=False).versions["ROOTCA"] != before["ROOTCA"]


def test_configurable_names_istio_federation(identities: FakeIdentities) -> None:
    config = SDSConfig(default_svid_name="default", root_ca_name=None, all_bundles_name="ROOTCA")
    secret: Any = run(identities, "ROOTCA", config=config).secrets["ROOTCA"]
    assert set(trust_domains(secret)) == {"example.org", "partner.org"}
    with pytest.raises(BadResourceNameError):
        run(identities, "ALL", config=config)


def test_configurable_names_renamed(identities: FakeIdentities) -> None:
    config = SDSConfig(default_svid_name="svid", root_ca_name="bundle", all_bundles_name="bundles")
    assert list(run(identities, "svid", "bundle", "bundles", config=config).secrets) == ["svid", "bundle", "bundles"]


@pytest.mark.parametrize(
    "values",
    [
        {"default_svid_name": "ROOTCA"},
        {"root_ca_name": "spiffe://example.org"},
        {"all_bundles_name": ""},
        {"all_bundles_name": "*"},
    ],
)
def test_config_rejects_ambiguous_names(values: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="sds resource name"):
        SDSConfig(**values)


def make_node(*, version: tuple[int, int, int] | None = (1, 40, 0), metadata: dict[str, Any] | None = None) -> Any:
    node = base_pb2.Node(id="frontend-sidecar", cluster="frontend")
    if version is not None:
        node.user_agent_build_version.version.major_number = version[0]
        node.user_agent_build_version.version.minor_number = version[1]
        node.user_agent_build_version.version.patch = version[2]
    if metadata is not None:
        struct = struct_pb2.Struct()
        struct.update(metadata)
        node.metadata.CopyFrom(struct)
    return node


def test_node_info() -> None:
    assert node_info(make_node()) == NodeInfo(id="frontend-sidecar", cluster="frontend", build_version=(1, 40, 0))
    assert node_info(make_node(version=None)).build_version is None


@pytest.mark.parametrize(
    ("metadata", "disabled"),
    [
        (None, False),
        ({"disable_spiffe_cert_validation": True}, True),
        ({"disable_spiffe_cert_validation": "true"}, True),
        ({"disable_spiffe_cert_validation": "True"}, True),
        ({"disable_spiffe_cert_validation": False}, False),
        ({"disable_spiffe_cert_validation": "no"}, False),
        ({"disable_spiffe_cert_validation": 1}, False),
        ({"other": True}, False),
    ],
)
def test_node_metadata_override(metadata: dict[str, Any] | None, disabled: bool) -> None:
    assert node_info(make_node(metadata=metadata)).disable_spiffe_validation is disabled


@pytest.mark.parametrize(
    ("config", "node", "enabled"),
    [
        (SDSConfig(), NodeInfo(build_version=(1, 40, 0)), True),
        (SDSConfig(), NodeInfo(build_version=(1, 18, 0)), True),
        (SDSConfig(), NodeInfo(build_version=(1, 17, 9)), False),
        (SDSConfig(), NodeInfo(build_version=(2, 0, 0)), True),
        (SDSConfig(), NodeInfo(), True),  # not an Envoy, or one that did not say: the modern default
        (SDSConfig(disable_spiffe_validation=True), NodeInfo(build_version=(1, 40, 0)), False),
        (SDSConfig(), NodeInfo(build_version=(1, 40, 0), disable_spiffe_validation=True), False),
    ],
)
def test_spiffe_validator_choice(config: SDSConfig, node: NodeInfo, enabled: bool) -> None:
    assert spiffe_validator_enabled(config, node) is enabled
