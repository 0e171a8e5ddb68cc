"""Workload API messages to and from spiffecore values: the one place that touches the generated code.

The server side turns an :class:`X509Context` and bundle maps into responses; the client side
parses responses back, refusing anything malformed with :class:`MalformedResponseError` (never a
raw exception of the parsers underneath). Bundle maps are keyed by trust domain ID
(``spiffe://<td>``), as the specification and SPIRE do; the client also accepts a bare name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

from google.protobuf import json_format, struct_pb2

from sidecar.workload.identities import X509Context
from spiffecore import JWTSVID, X509SVID, JWTBundle, SpiffeError, SpiffeID, TrustDomain, X509Bundle
from spiffeproto import workload_pb2


class MalformedResponseError(SpiffeError, ValueError):
    """A Workload API response breaks the specification (or holds something our parsers refuse)."""

    layer = "workloadapi"


# --- server side: values to messages ------------------------------------------------------------


def x509_svid_response(context: X509Context) -> workload_pb2.X509SVIDResponse:
    """The caller's SVIDs (chain, PKCS#8 key, own bundle, hint) and federated bundles."""
    bundle = context.bundle.der()
    return workload_pb2.X509SVIDResponse(
        svids=[
            workload_pb2.X509SVID(
                spiffe_id=str(svid.id),
                x509_svid=svid.cert_chain_der(),
                x509_svid_key=svid.private_key_der(),
                bundle=bundle,
                hint=svid.hint,
            )
            for svid in context.svids
        ],
        federated_bundles={td.id_string(): b.der() for td, b in context.federated.items()},
    )


def x509_bundles_response(bundles: Mapping[TrustDomain, X509Bundle]) -> workload_pb2.X509BundlesResponse:
    return workload_pb2.X509BundlesResponse(bundles={td.id_string(): b.der() for td, b in bundles.items()})


def jwt_bundles_response(bundles: Mapping[TrustDomain, JWTBundle]) -> workload_pb2.JWTBundlesResponse:
    """Standard JWKS documents (no ``use``, no sequence), as the specification requires."""
    return workload_pb2.JWTBundlesResponse(bundles={td.id_string(): b.jwks() for td, b in bundles.items()})


def jwt_svid_response(svids: Iterable[JWTSVID]) -> workload_pb2.JWTSVIDResponse:
    return workload_pb2.JWTSVIDResponse(
        svids=[workload_pb2.JWTSVID(spiffe_id=str(s.id), svid=s.token, hint=s.hint) for s in svids]
    )


def validate_jwt_svid_response(spiffe_id: SpiffeID, claims: Mapping[str, Any]) -> workload_pb2.ValidateJWTSVIDResponse:
    struct = struct_pb2.Struct()
    struct.update(dict(claims))
    return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(spiffe_id), claims=struct)


# --- client side: messages to values ------------------------------------------------------------


def _trust_domain(key: str, what: str) -> TrustDomain:
    try:
        return TrustDomain.parse(key)
    except SpiffeError as err:
        raise MalformedResponseError(f"{what} key is not a trust domain ID ({err.rule})", key) from err


def x509_context_from_response(response: workload_pb2.X509SVIDResponse) -> X509Context:
    """The caller's X.509 context; the default SVID's trust domain bundle becomes ``bundle``.

    Bundles of other SVIDs' trust domains (no known server sends such) join ``federated``.
    """
    if not response.svids:
        raise MalformedResponseError("X.509-SVID response has no SVID")
    svids: list[X509SVID] = []
    own: dict[TrustDomain, X509Bundle] = {}
    hints: set[str] = set()
    for index, message in enumerate(response.svids):
        try:
            svid = X509SVID.load_der(message.x509_svid, message.x509_svid_key, hint=message.hint)
        except SpiffeError as err:
            raise MalformedResponseError(f"X.509-SVID {index} is malformed ({err})") from err
        if message.spiffe_id and message.spiffe_id != str(svid.id):
            raise MalformedResponseError(
                f"X.509-SVID {index}: spiffe_id does not match the certificate ({svid.id})", message.spiffe_id
            )
        if message.hint and message.hint in hints:
            # The specification: on duplicate hints a client takes the first; the rest are dropped.
            continue
        hints.add(message.hint)
        td = svid.id.trust_domain
        if td not in own:
            try:
                own[td] = X509Bundle.load_der(td, message.bundle)
            except SpiffeError as err:
                raise MalformedResponseError(f"X.509-SVID {index}: bundle is malformed ({err})") from err
        svids.append(svid)
    federated = x509_bundles_from_map(response.federated_bundles, "federated bundle")
    default_td = svids[0].id.trust_domain
    merged = {**federated, **{td: b for td, b in own.items() if td != default_td}}
    return X509Context(svids=tuple(svids), bundle=own[default_td], federated=MappingProxyType(merged))


def x509_bundles_from_map(bundles: Mapping[str, bytes], what: str = "X.509 bundle") -> Mapping[TrustDomain, X509Bundle]:
    result: dict[TrustDomain, X509Bundle] = {}
    for key in sorted(bundles):
        td = _trust_domain(key, what)
        if td in result:
            raise MalformedResponseError(f"duplicate {what} for trust domain", key)
        try:
            result[td] = X509Bundle.load_der(td, bundles[key])
        except SpiffeError as err:
            raise MalformedResponseError(f"{what} is malformed ({err})", key) from err
    return MappingProxyType(result)


def x509_bundles_from_response(response: workload_pb2.X509BundlesResponse) -> Mapping[TrustDomain, X509Bundle]:
    return x509_bundles_from_map(response.bundles)


def jwt_bundles_from_response(response: workload_pb2.JWTBundlesResponse) -> Mapping[TrustDomain, JWTBundle]:
    result: dict[TrustDomain, JWTBundle] = {}
    for key in sorted(response.bundles):
        td = _trust_domain(key, "JWT bundle")
        if td in result:
            raise MalformedResponseError("duplicate JWT bundle for trust domain", key)
        try:
            result[td] = JWTBundle.load_jwks(td, response.bundles[key])
        except SpiffeError as err:
            raise MalformedResponseError(f"JWT bundle is malformed ({err})", key) from err
    return MappingProxyType(result)


def jwt_svids_from_response(
    response: workload_pb2.JWTSVIDResponse, audience: tuple[str, ...], *, at: datetime
) -> tuple[JWTSVID, ...]:
    """The JWT-SVIDs, parsed without checking signatures (they come from our own trusted agent)."""
    if not response.svids:
        raise MalformedResponseError("JWT-SVID response has no SVID")
    svids: list[JWTSVID] = []
    for index, message in enumerate(response.svids):
        try:
            svid = JWTSVID.parse_insecure(message.svid, audience, at=at, hint=message.hint)
        except SpiffeError as err:
            raise MalformedResponseError(f"JWT-SVID {index} is malformed ({err})") from err
        if message.spiffe_id and message.spiffe_id != str(svid.id):
            raise MalformedResponseError(
                f"JWT-SVID {index}: spiffe_id does not match the token's subject ({svid.id})", message.spiffe_id
            )
        svids.append(svid)
    return tuple(svids)


def claims_from_struct(claims: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(claims)
