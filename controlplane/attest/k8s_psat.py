"""``k8s_psat``: the agent presents its pod's projected service account token (PSAT).

The agent runs as a pod (a DaemonSet) with a service account token projected for the server's
audience, and sends ``{"cluster": <name>, "token": <the token>}``. The server verifies the token
itself, against the cluster's service account issuer keys (a JWK Set from a file or a URL: see
:mod:`controlplane.attest.jwks`), not through the Kubernetes TokenReview API as SPIRE does. The
checks, in order, each failing with its own message (the token is never quoted):

1. the payload: a JSON object of at most :data:`MAX_PAYLOAD_BYTES` with exactly ``cluster`` and
   ``token``, a cluster this server is configured for;
2. the signature: an asymmetric algorithm (RS, PS or ES, 256 to 512; never ``none`` or HMAC), a
   ``kid`` naming one of the cluster's issuer keys, of a type that fits the algorithm;
3. the time: ``exp`` present and not past, ``nbf`` and ``iat`` (when present) not in the future,
   each with :data:`LEEWAY`;
4. the audience (one of the configured ones) and, if configured, the issuer (``iss``);
5. the Kubernetes claims: ``kubernetes.io`` with the namespace, the service account, the pod and
   the node (each name and uid), and ``sub`` = ``system:serviceaccount:<ns>:<sa>``;
6. the allow-list: ``<namespace>:<service account>`` must be one the cluster allows.

**The token must be bound to a node.** Kubernetes 1.30 and later put the node (name and uid) of
the pod into its projected tokens (``kubernetes.io.node``). SPIRE looks the node up through the
API server instead; this server talks to no API server, so a token without the node claim is
refused: an agent's identity is its node's.

The agent ID is ``spiffe://<td>/spire/agent/k8s_psat/<cluster>/<node uid>``, as in SPIRE, and the
selectors are SPIRE's: ``k8s_psat:cluster:<name>``, ``k8s_psat:agent_ns:<ns>``,
``k8s_psat:agent_sa:<sa>``, ``k8s_psat:agent_pod_name:<pod>``, ``k8s_psat:agent_pod_uid:<uid>``,
``k8s_psat:agent_node_name:<node>`` and ``k8s_psat:agent_node_uid:<uid>``.

**Re-attestation.** Agents may attest again (the kubelet refreshes the token file before it
expires, and the agent reads it afresh each time). A token can be presented again for as long as it
is valid, as in SPIRE: it is bound to a pod and a node, and the agent it yields is that node's.
Attesting again under one node uid supersedes the agent SVID issued before (the store keeps one
serial per agent), so a copied token can displace the node's agent only until the token expires,
and never obtain another node's identity. Keep token lifetimes short (``expirationSeconds: 600``,
the shortest Kubernetes allows) and the audience specific to the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

import jwt
from jwt.types import Options

from controlplane.attest.base import Attestation, AttestationError, ChallengeChannel
from controlplane.attest.jwks import SIGNING_ALGORITHMS, IssuerKey, JWKSError, UnknownKeyError
from controlplane.model import ModelError, Selector, agent_id
from spiffecore import SpiffeIDError, TrustDomain

NAME: Final = "k8s_psat"
DEFAULT_AUDIENCE: Final = "spiffe-server"
MAX_PAYLOAD_BYTES: Final = 16 * 1024
LEEWAY: Final = timedelta(seconds=30)
KUBERNETES_CLAIM: Final = "kubernetes.io"

_CLUSTER_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Kubernetes object names: a namespace is a DNS-1123 label, the others DNS-1123 subdomains.
_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN_RE: Final = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?")
_UID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

log = logging.getLogger(__name__)

_SIGNATURE_ONLY: Final[Options] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "enforce_minimum_key_length": True,
}


def check_cluster_name(name: str) -> str:
    """``name`` if it can be a cluster's name (it is a segment of agent IDs), else ``ValueError``."""
    if not _CLUSTER_NAME_RE.fullmatch(name):
        raise ValueError(
            f"k8s_psat cluster name must be 1 to 128 letters, digits, '.', '_' or '-' (it becomes part of"
            f" agent IDs): {name!r}"
        )
    return name


def parse_service_account(entry: str) -> tuple[str, str]:
    """``(namespace, name)`` of an allow-list entry ``<namespace>:<service account>``, else ``ValueError``."""
    namespace, colon, name = entry.partition(":")
    if not colon or not _LABEL_RE.fullmatch(namespace) or not _SUBDOMAIN_RE.fullmatch(name):
        raise ValueError(f"service_account_allow_list entries must be NAMESPACE:SERVICE_ACCOUNT: {entry!r}")
    return namespace, name


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterPolicy:
    """What one cluster's tokens must satisfy: audiences, issuer, the service accounts allowed."""

    name: str
    allowed: frozenset[tuple[str, str]]
    audience: tuple[str, ...] = (DEFAULT_AUDIENCE,)
    issuer: str | None = None

    def __post_init__(self) -> None:
        check_cluster_name(self.name)
        if not self.allowed:
            raise ValueError(f"k8s_psat cluster {self.name!r} must allow at least one service account")
        if not self.audience or not all(self.audience):
            raise ValueError(f"k8s_psat cluster {self.name!r} needs at least one non-empty audience")

    @classmethod
    def build(
        cls, name: str, *, allow_list: Iterable[str], audience: Iterable[str], issuer: str | None = None
    ) -> ClusterPolicy:
        return cls(
            name=name,
            allowed=frozenset(parse_service_account(entry) for entry in allow_list),
            audience=tuple(audience),
            issuer=issuer,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PodIdentity:
    """What a verified token says of the pod that holds it."""

    namespace: str
    service_account: str
    service_account_uid: str
    pod_name: str
    pod_uid: str
    node_name: str
    node_uid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """The agent's payload, read: the cluster it names and its token."""

    cluster: str
    token: str

    def __repr__(self) -> str:
        return f"Evidence(cluster={self.cluster!r}, token=<{len(self.token)} characters>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenHeader:
    algorithm: str
    kid: str


def payload_bytes(cluster: str, token: str) -> bytes:
    """The payload an agent sends: ``{"cluster": ..., "token": ...}`` as JSON."""
    return json.dumps({"cluster": cluster, "token": token}).encode()


def parse_evidence(payload: bytes) -> Evidence:
    """The cluster and token of an agent's payload, or :class:`AttestationError`."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise AttestationError(f"k8s_psat payload is larger than {MAX_PAYLOAD_BYTES} bytes", len(payload))
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
        raise AttestationError('k8s_psat payload is not JSON (expected {"cluster": ..., "token": ...})') from None
    if not isinstance(document, dict):
        raise AttestationError('k8s_psat payload is not a JSON object (expected {"cluster": ..., "token": ...})')
    unknown = sorted(set(document) - {"cluster", "token"})
    if unknown:
        raise AttestationError("k8s_psat payload has unknown keys", ", ".join(unknown))
    cluster, token = document.get("cluster"), document.get("token")
    if not isinstance(cluster, str) or not cluster:
        raise AttestationError("k8s_psat payload needs the cluster's name as a non-empty string")
    if not isinstance(token, str) or not token:
        raise AttestationError("k8s_psat payload needs the token as a non-empty string")
    return Evidence(cluster=cluster, token=token)


def read_header(token: str) -> TokenHeader:
    """The token's algorithm and key ID (unverified: the signature check comes next)."""
    try:
        header = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, RecursionError):
        raise AttestationError("k8s_psat token is not a well-formed JWT") from None
    algorithm, kid = header.get("alg"), header.get("kid")
    if algorithm not in SIGNING_ALGORITHMS:
        raise AttestationError(
            f"k8s_psat token algorithm is not allowed (allowed: {', '.join(SIGNING_ALGORITHMS)})", algorithm
        )
    if not isinstance(kid, str) or not kid:
        raise AttestationError("k8s_psat token header has no kid (key ID)")
    assert isinstance(algorithm, str)
    return TokenHeader(algorithm=algorithm, kid=kid)


def _verify_signature(token: str, header: TokenHeader, key: IssuerKey) -> dict[str, object]:
    if not key.fits(header.algorithm):
        raise AttestationError(
            f"k8s_psat token algorithm does not fit the issuer key {key.kid!r} ({key.kind} key"
            f"{', alg ' + key.algorithm if key.algorithm else ''})",
            header.algorithm,
        )
    try:
        claims: dict[str, object] = jwt.decode(
            token, key=key.key, algorithms=[header.algorithm], options=_SIGNATURE_ONLY
        )
    except jwt.InvalidSignatureError:
        raise AttestationError("k8s_psat token signature does not verify against the cluster's issuer key") from None
    except jwt.InvalidKeyError:
        raise AttestationError(f"k8s_psat issuer key {key.kid!r} is too weak to verify tokens with") from None
    except (jwt.PyJWTError, ValueError, RecursionError):
        raise AttestationError("k8s_psat token is not a well-formed signed JWT") from None
    return claims


def _instant(claims: Mapping[str, object], name: str, *, required: bool) -> datetime | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    if value is None:
        raise AttestationError(f"k8s_psat token has no {name} claim")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AttestationError(f"k8s_psat token claim {name} is not a number", value)
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise AttestationError(f"k8s_psat token claim {name} is out of range", value) from None


def _check_time(claims: Mapping[str, object], now: datetime) -> None:
    expires = _instant(claims, "exp", required=True)
    assert expires is not None
    if now > expires + LEEWAY:
        raise AttestationError("k8s_psat token has expired", expires.isoformat())
    not_before = _instant(claims, "nbf", required=False)
    if not_before is not None and now + LEEWAY < not_before:
        raise AttestationError("k8s_psat token is not valid yet", not_before.isoformat())
    issued = _instant(claims, "iat", required=False)
    if issued is not None and now + LEEWAY < issued:
        raise AttestationError("k8s_psat token was issued in the future", issued.isoformat())


def _check_audience_and_issuer(claims: Mapping[str, object], policy: ClusterPolicy) -> None:
    audience = claims.get("aud")
    values = [audience] if isinstance(audience, str) else audience
    if not isinstance(values, list) or not values or not all(isinstance(value, str) for value in values):
        raise AttestationError("k8s_psat token has no audience (aud claim)")
    if not set(values) & set(policy.audience):
        raise AttestationError(
            f"k8s_psat token audience is not one this server accepts (accepted: {', '.join(policy.audience)})",
            ", ".join(str(value) for value in values),
        )
    if policy.issuer is not None and claims.get("iss") != policy.issuer:
        raise AttestationError(
            f"k8s_psat token issuer is not the cluster's ({policy.issuer})", claims.get("iss", "(none)")
        )


def _field(container: Mapping[str, object], name: str, path: str, pattern: re.Pattern[str]) -> str:
    value = container.get(name)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise AttestationError(f"k8s_psat token claim {path}.{name} is missing or malformed", value)
    return value


def _object(container: Mapping[str, object], name: str, path: str, missing: str) -> Mapping[str, object]:
    value = container.get(name)
    if value is None:
        raise AttestationError(missing)
    if not isinstance(value, dict):
        raise AttestationError(f"k8s_psat token claim {path}.{name} is not an object")
    return value


def read_pod_identity(claims: Mapping[str, object]) -> PodIdentity:
    """The namespace, service account, pod and node of the ``kubernetes.io`` claim, all required."""
    k8s = _object(
        claims,
        KUBERNETES_CLAIM,
        "token",
        "k8s_psat token has no kubernetes.io claim: it is not a Kubernetes service account token",
    )
    namespace = _field(k8s, "namespace", KUBERNETES_CLAIM, _LABEL_RE)
    path = KUBERNETES_CLAIM
    account = _object(k8s, "serviceaccount", path, "k8s_psat token has no kubernetes.io.serviceaccount claim")
    pod = _object(
        k8s,
        "pod",
        path,
        "k8s_psat token is not bound to a pod (no kubernetes.io.pod claim): use a projected service account token",
    )
    node = _object(
        k8s,
        "node",
        path,
        "k8s_psat token is not bound to a node (no kubernetes.io.node claim): projected tokens carry the node"
        " from Kubernetes 1.30",
    )
    identity = PodIdentity(
        namespace=namespace,
        service_account=_field(account, "name", f"{path}.serviceaccount", _SUBDOMAIN_RE),
        service_account_uid=_field(account, "uid", f"{path}.serviceaccount", _UID_RE),
        pod_name=_field(pod, "name", f"{path}.pod", _SUBDOMAIN_RE),
        pod_uid=_field(pod, "uid", f"{path}.pod", _UID_RE),
        node_name=_field(node, "name", f"{path}.node", _SUBDOMAIN_RE),
        node_uid=_field(node, "uid", f"{path}.node", _UID_RE),
    )
    subject = f"system:serviceaccount:{identity.namespace}:{identity.service_account}"
    if claims.get("sub") != subject:
        raise AttestationError(
            f"k8s_psat token subject is not its service account's ({subject})", claims.get("sub", "(none)")
        )
    return identity


def verify_token(token: str, key: IssuerKey, policy: ClusterPolicy, *, now: datetime) -> PodIdentity:
    """Verify ``token`` with the issuer ``key`` it names, at ``now``, by ``policy``. Pure.

    Returns the pod it identifies, or raises :class:`AttestationError` naming the broken rule.
    """
    header = read_header(token)
    if header.kid != key.kid:
        raise AttestationError("k8s_psat token names another key than the one given", header.kid)
    claims = _verify_signature(token, header, key)
    _check_time(claims, now)
    _check_audience_and_issuer(claims, policy)
    identity = read_pod_identity(claims)
    account = (identity.namespace, identity.service_account)
    if account not in policy.allowed:
        raise AttestationError(
            f"k8s_psat service account is not allowed to attest agents in cluster {policy.name!r}"
            " (service_account_allow_list)",
            f"{identity.namespace}:{identity.service_account}",
        )
    return identity


def selectors(cluster: str, identity: PodIdentity) -> tuple[Selector, ...]:
    """SPIRE's ``k8s_psat`` node selectors for an agent pod."""
    values = (
        ("cluster", cluster),
        ("agent_ns", identity.namespace),
        ("agent_sa", identity.service_account),
        ("agent_pod_name", identity.pod_name),
        ("agent_pod_uid", identity.pod_uid),
        ("agent_node_name", identity.node_name),
        ("agent_node_uid", identity.node_uid),
    )
    return tuple(Selector(type=NAME, value=f"{kind}:{value}") for kind, value in values)


class IssuerKeys(Protocol):
    """A cluster's issuer keys by key ID (:class:`~controlplane.attest.jwks.KeyCache`). Blocking."""

    def key(self, kid: str) -> IssuerKey: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    """A cluster this server attests agents of: its policy and where its issuer keys come from."""

    policy: ClusterPolicy
    keys: IssuerKeys


class K8sPsatAttestor:
    """Attests agents by the projected service account tokens of their pods."""

    name = NAME

    def __init__(
        self, *, trust_domain: TrustDomain, clusters: Iterable[Cluster], clock: Callable[[], datetime]
    ) -> None:
        self._trust_domain = trust_domain
        self._clusters = {cluster.policy.name: cluster for cluster in clusters}
        if not self._clusters:
            raise AttestationError("k8s_psat needs at least one cluster")
        self._clock = clock

    async def attest(self, payload: bytes, channel: ChallengeChannel) -> Attestation:
        evidence = parse_evidence(payload)
        cluster = self._clusters.get(evidence.cluster)
        if cluster is None:
            raise AttestationError("k8s_psat cluster is not one this server attests agents of", evidence.cluster)
        header = read_header(evidence.token)
        try:
            key = await asyncio.to_thread(cluster.keys.key, header.kid)
        except UnknownKeyError:
            raise AttestationError(
                f"k8s_psat token key ID is not among the issuer keys of cluster {evidence.cluster!r}", header.kid
            ) from None
        except JWKSError as err:
            log.warning(
                "k8s_psat: the issuer keys of a cluster are unavailable",
                extra={"cluster": evidence.cluster, "error": str(err)},
            )
            raise AttestationError(
                f"k8s_psat issuer keys of cluster {evidence.cluster!r} are unavailable (the server's log says why)"
            ) from None
        identity = verify_token(evidence.token, key, cluster.policy, now=self._clock())
        try:
            spiffe_id = agent_id(self._trust_domain, NAME, evidence.cluster, identity.node_uid)
            node_selectors = selectors(evidence.cluster, identity)
        except (SpiffeIDError, ModelError) as err:
            raise AttestationError(f"k8s_psat token claims cannot name an agent ({err.rule})") from err
        return Attestation(agent_id=spiffe_id, selectors=node_selectors, can_reattest=True)
