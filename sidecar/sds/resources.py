"""SDS resources: which secret a name means for a caller, and the Envoy ``Secret`` messages.

Resource names (the configurable ones in :class:`SDSConfig`; SPIRE's and Istio's defaults):

============================  ==================================================================
name                          secret
============================  ==================================================================
``default``                   the caller's first X.509-SVID (``TlsCertificate``)
``spiffe://td/path``          the caller's X.509-SVID with that SPIFFE ID
``ROOTCA``                    the agent's own trust domain's bundle (validation context)
``ALL``                       the own and every federated bundle the caller may see (SPIFFE
                              validator only: one ``trusted_ca`` mixing domains would accept any
                              domain's roots for any ID)
``spiffe://td``               that trust domain's bundle, own or federated with the caller
(no name at all)              everything: each SVID by SPIFFE ID, each bundle by trust domain ID
============================  ==================================================================

Bundles go to Envoy as the SPIFFE certificate validator (``envoy.tls.cert_validator.spiffe``,
one trust bundle per trust domain: a peer is checked only against its own domain's roots, and
only URI SANs count), unless the Envoy is older than 1.18, the agent's configuration disables it,
or the node metadata says ``disable_spiffe_cert_validation: true``: then ``trusted_ca``.

Each secret's version is a hash of its serialized form, so the same content always has the same
version, across streams and agent restarts alike.

A name the caller is not entitled to fails the whole request (:class:`NotAuthorizedError`, naming
only what the caller asked for); nothing of another workload is ever built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from envoy.config.core.v3 import base_pb2, extension_pb2  # type: ignore[import-untyped]
from envoy.extensions.transport_sockets.tls.v3 import (  # type: ignore[import-untyped]
    common_pb2,
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from google.protobuf import any_pb2
from google.protobuf.message import Message

from sidecar.workload.identities import X509Context
from spiffecore import X509SVID, SpiffeError, SpiffeID, SpiffeIDError, TrustDomain, X509Bundle

SECRET_TYPE_URL: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
SPIFFE_VALIDATOR: Final = "envoy.tls.cert_validator.spiffe"
DISABLE_VALIDATION_KEY: Final = "disable_spiffe_cert_validation"
FIRST_SPIFFE_VALIDATOR_VERSION: Final = (1, 18)
_SPIFFE_PREFIX: Final = "spiffe://"


class SDSError(SpiffeError):
    """A request for secrets cannot be answered; the message says why, for the gRPC status."""

    layer = "sds"


class NoIdentityError(SDSError):
    """No registration entry applies to the caller."""


class BadResourceNameError(SDSError):
    """A name that is none of the configured names nor a SPIFFE ID."""


class NotAuthorizedError(SDSError):
    """Names the caller is not entitled to (only the caller's own request is quoted)."""


class ValidatorRequiredError(SDSError):
    """All bundles were asked for where only ``trusted_ca`` can be sent."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SDSConfig:
    """Resource names and the validation-context choice. ``None`` disables a name.

    Istio with federation wants its ``ROOTCA`` to mean all bundles:
    ``SDSConfig(root_ca_name=None, all_bundles_name="ROOTCA")``.
    """

    default_svid_name: str | None = "default"
    root_ca_name: str | None = "ROOTCA"
    all_bundles_name: str | None = "ALL"
    disable_spiffe_validation: bool = False

    def __post_init__(self) -> None:
        names = [n for n in (self.default_svid_name, self.root_ca_name, self.all_bundles_name) if n is not None]
        for name in names:
            if not name or name.startswith(_SPIFFE_PREFIX) or name == "*":
                raise ValueError(f"sds resource name must be non-empty, not '*' and not a SPIFFE ID: {name!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"sds resource names must differ from each other: {names!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """What matters of an Envoy ``Node``: who it is, its version, its metadata override."""

    id: str = ""
    cluster: str = ""
    build_version: tuple[int, int, int] | None = None
    disable_spiffe_validation: bool = False


def node_info(node: Any) -> NodeInfo:
    """Read an ``envoy.config.core.v3.Node``."""
    build: tuple[int, int, int] | None = None
    if node.HasField("user_agent_build_version") and node.user_agent_build_version.HasField("version"):
        version = node.user_agent_build_version.version
        build = (int(version.major_number), int(version.minor_number), int(version.patch))
    disable = False
    value = node.metadata.fields.get(DISABLE_VALIDATION_KEY)
    if value is not None:
        kind = value.WhichOneof("kind")
        disable = (kind == "bool_value" and bool(value.bool_value)) or (
            kind == "string_value" and str(value.string_value).strip().lower() == "true"
        )
    return NodeInfo(id=str(node.id), cluster=str(node.cluster), build_version=build, disable_spiffe_validation=disable)


def spiffe_validator_enabled(config: SDSConfig, node: NodeInfo) -> bool:
    """The SPIFFE validator, unless disabled or the Envoy predates it (unknown versions get it)."""
    if config.disable_spiffe_validation or node.disable_spiffe_validation:
        return False
    return node.build_version is None or node.build_version[:2] >= FIRST_SPIFFE_VALIDATOR_VERSION


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolved:
    """The secrets for a request, by name in the order asked, with their content versions."""

    secrets: Mapping[str, Message]
    versions: Mapping[str, str]


def secret_version(secret: Message) -> str:
    return hashlib.sha256(secret.SerializeToString(deterministic=True)).hexdigest()[:16]


def _data(data: bytes) -> Any:
    return base_pb2.DataSource(inline_bytes=data)


def tls_certificate_secret(name: str, svid: X509SVID) -> Message:
    """A ``Secret`` with the SVID's chain (leaf first) and its PKCS#8 key, inline."""
    secret: Message = secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=_data(svid.cert_chain_pem()), private_key=_data(svid.private_key_pem())
        ),
    )
    return secret


def validation_context_secret(name: str, bundles: Sequence[X509Bundle], *, spiffe_validator: bool) -> Message:
    """A ``Secret`` with a validation context: the SPIFFE validator over ``bundles`` (one trust
    bundle per trust domain), or ``trusted_ca`` of exactly one bundle."""
    if spiffe_validator:
        config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(
            trust_domains=[
                tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
                    name=bundle.trust_domain.name, trust_bundle=_data(bundle.pem())
                )
                for bundle in sorted(bundles, key=lambda b: b.trust_domain.name)
            ]
        )
        typed = any_pb2.Any()
        typed.Pack(config)
        context = common_pb2.CertificateValidationContext(
            custom_validator_config=extension_pb2.TypedExtensionConfig(name=SPIFFE_VALIDATOR, typed_config=typed)
        )
    else:
        if len(bundles) != 1:
            raise ValidatorRequiredError(
                "trusted_ca holds one trust domain's roots; several bundles need the SPIFFE validator", name
            )
        context = common_pb2.CertificateValidationContext(trusted_ca=_data(bundles[0].pem()))
    secret: Message = secret_pb2.Secret(name=name, validation_context=context)
    return secret


def resolve(
    names: Iterable[str], context: X509Context | None, config: SDSConfig, *, spiffe_validator: bool
) -> Resolved | None:
    """The secrets ``names`` mean for a caller with ``context``; no names: everything it has.

    ``None`` while the caller's SVIDs are still being signed and one is needed. Raises
    :class:`NoIdentityError`, :class:`BadResourceNameError`, :class:`NotAuthorizedError` or
    :class:`ValidatorRequiredError`.
    """
    if context is None:
        raise NoIdentityError("no identity issued")
    requested = tuple(dict.fromkeys(names))
    bundles: dict[TrustDomain, X509Bundle] = {context.bundle.trust_domain: context.bundle, **context.federated}
    secrets: dict[str, Message] = {}
    if not requested:
        if not context.svids:
            return None
        for svid in context.svids:
            secrets.setdefault(str(svid.id), tls_certificate_secret(str(svid.id), svid))
        for td in sorted(bundles, key=lambda td: td.name):
            name = td.id_string()
            secrets[name] = validation_context_secret(name, [bundles[td]], spiffe_validator=spiffe_validator)
        return _resolved(secrets)
    refused: list[str] = []
    pending = False
    for name in requested:
        if name == config.default_svid_name:
            if not context.svids:
                pending = True
                continue
            secrets[name] = tls_certificate_secret(name, context.svids[0])
        elif name == config.root_ca_name:
            secrets[name] = validation_context_secret(name, [context.bundle], spiffe_validator=spiffe_validator)
        elif name == config.all_bundles_name:
            if not spiffe_validator:
                raise ValidatorRequiredError(
                    "all bundles can only be sent with the SPIFFE certificate validator, which is disabled", name
                )
            ordered = [bundles[td] for td in sorted(bundles, key=lambda td: td.name)]
            secrets[name] = validation_context_secret(name, ordered, spiffe_validator=True)
        elif name.startswith(_SPIFFE_PREFIX):
            try:
                spiffe_id = SpiffeID.parse(name)
            except SpiffeIDError as err:
                raise BadResourceNameError(f"resource name is not a valid SPIFFE ID ({err.rule})", name) from err
            if spiffe_id.path:
                match = next((s for s in context.svids if s.id == spiffe_id), None)
                if match is not None:
                    secrets[name] = tls_certificate_secret(name, match)
                elif not context.svids:
                    pending = True
                else:
                    refused.append(name)
            elif (bundle := bundles.get(spiffe_id.trust_domain)) is not None:
                secrets[name] = validation_context_secret(name, [bundle], spiffe_validator=spiffe_validator)
            else:
                refused.append(name)
        else:
            known = [n for n in (config.default_svid_name, config.root_ca_name, config.all_bundles_name) if n]
            raise BadResourceNameError(f"resource name must be one of {known}, a SPIFFE ID or a trust domain ID", name)
    if refused:
        raise NotAuthorizedError("workload is not authorized for the requested resources", ", ".join(refused))
    if pending:
        return None
    return _resolved(secrets)


def _resolved(secrets: dict[str, Message]) -> Resolved:
    return Resolved(secrets=secrets, versions={name: secret_version(secret) for name, secret in secrets.items()})
