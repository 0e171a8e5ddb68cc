"""The k8s_psat attestor against tokens a test issuer signs, with its keys in a real JWKS file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from controlplane.attest.base import Attestation, AttestationError
from controlplane.attest.jwks import JWKSFile, KeyCache
from controlplane.attest.k8s_psat import (
    MAX_PAYLOAD_BYTES,
    Cluster,
    ClusterPolicy,
    Evidence,
    K8sPsatAttestor,
    parse_service_account,
    payload_bytes,
)
from controlplane.model import Selector
from spiffecore import TrustDomain
from tests.support.ca import NOW
from tests.support.psat import ISSUER, Issuer, Pod

TD = TrustDomain.parse("example.org")
CLUSTER = "prod-eu"
ALLOWED = ("spiffe:spiffe-agent", "kube-system:node-agent")


class NoChallenges:
    async def challenge(self, challenge: bytes) -> bytes:
        raise AssertionError("k8s_psat sends no challenge")


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    issuer = Issuer("rsa", kid="rsa-1")
    issuer.add_key("ec-p256", kid="ec-1")
    return issuer


@pytest.fixture
def make_attestor(issuer: Issuer, tmp_path: Path) -> Callable[..., K8sPsatAttestor]:
    def make(*, issuer_name: str | None = None, audience: tuple[str, ...] = ("spiffe-server",)) -> K8sPsatAttestor:
        jwks = tmp_path / "jwks.json"
        jwks.write_bytes(issuer.jwks())
        policy = ClusterPolicy.build(CLUSTER, allow_list=ALLOWED, audience=audience, issuer=issuer_name)
        cluster = Cluster(policy=policy, keys=KeyCache(JWKSFile(jwks)))
        return K8sPsatAttestor(trust_domain=TD, clusters=[cluster], clock=lambda: NOW)

    return make


@pytest.fixture
def attestor(make_attestor: Callable[..., K8sPsatAttestor]) -> K8sPsatAttestor:
    return make_attestor()


async def attest(attestor: K8sPsatAttestor, token: str, *, cluster: str = CLUSTER) -> Attestation:
    return await attestor.attest(payload_bytes(cluster, token), NoChallenges())


async def refused(attestor: K8sPsatAttestor, payload: bytes, *, secret: str = "") -> str:
    """The refusal's message; it never quotes the token."""
    with pytest.raises(AttestationError) as caught:
        await attestor.attest(payload, NoChallenges())
    message = str(caught.value)
    if secret:
        assert secret not in message
        assert secret.split(".")[1] not in message  # not even the claims part
    return message


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand (what a signing library would refuse to make)."""
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{_b64(signature)}"


# --- what a good token yields -----------------------------------------------------------------


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
async def test_a_projected_token_names_the_nodes_agent_with_spires_selectors(
    attestor: K8sPsatAttestor, issuer: Issuer, kid: str
) -> None:
    pod = Pod()
    result = await attest(attestor, issuer.token(pod, now=NOW, kid=kid))
    assert str(result.agent_id) == f"spiffe://example.org/spire/agent/k8s_psat/{CLUSTER}/{pod.node_uid}"
    assert result.can_reattest
    assert [str(s) for s in result.selectors] == [
        f"k8s_psat:cluster:{CLUSTER}",
        "k8s_psat:agent_ns:spiffe",
        "k8s_psat:agent_sa:spiffe-agent",
        f"k8s_psat:agent_pod_name:{pod.name}",
        f"k8s_psat:agent_pod_uid:{pod.uid}",
        "k8s_psat:agent_node_name:node-a",
        f"k8s_psat:agent_node_uid:{pod.node_uid}",
    ]
    assert all(isinstance(s, Selector) and s.type == "k8s_psat" for s in result.selectors)


async def test_another_pod_on_the_same_node_is_the_same_agent(attestor: K8sPsatAttestor, issuer: Issuer) -> None:
    """The agent ID is the node's: a new agent pod (after an upgrade) supersedes the old one."""
    first = Pod()
    second = Pod(name="spiffe-agent-q9w4z", node_uid=first.node_uid)
    a = await attest(attestor, issuer.token(first, now=NOW))
    b = await attest(attestor, issuer.token(second, now=NOW))
    assert a.agent_id == b.agent_id
    assert a.selectors != b.selectors


async def test_a_token_may_be_presented_again_while_it_is_valid(attestor: K8sPsatAttestor, issuer: Issuer) -> None:
    token = issuer.token(Pod(), now=NOW)
    assert (await attest(attestor, token)).agent_id == (await attest(attestor, token)).agent_id


async def test_time_claims_have_a_small_leeway(attestor: K8sPsatAttestor, issuer: Issuer) -> None:
    pod = Pod()
    expired_just_now = issuer.token(pod, now=NOW - timedelta(minutes=10, seconds=20))
    issued_in_a_moment = issuer.token(pod, now=NOW + timedelta(seconds=20))
    assert (await attest(attestor, expired_just_now)).agent_id == (await attest(attestor, issued_in_a_moment)).agent_id


async def test_a_single_string_audience_and_any_listed_audience_count(
    make_attestor: Callable[..., K8sPsatAttestor], issuer: Issuer
) -> None:
    attestor = make_attestor(audience=("spiffe-server", "spire-server"))
    await attest(attestor, issuer.token(Pod(), now=NOW, aud="spire-server"))
    await attest(attestor, issuer.token(Pod(), now=NOW, aud=["api", "spiffe-server"]))


async def test_the_issuer_is_checked_when_configured(
    make_attestor: Callable[..., K8sPsatAttestor], issuer: Issuer
) -> None:
    attestor = make_attestor(issuer_name=ISSUER)
    await attest(attestor, issuer.token(Pod(), now=NOW))
    token = issuer.token(Pod(), now=NOW, iss="https://evil.example")
    assert await refused(attestor, payload_bytes(CLUSTER, token), secret=token) == (
        f'attest: k8s_psat token issuer is not the cluster\'s ({ISSUER}): "https://evil.example"'
    )


# --- tokens that are refused --------------------------------------------------------------------

POD = Pod(uid="pod-uid-1", node_uid="node-uid-1", service_account_uid="sa-uid-1")


def _k8s(**changes: Any) -> dict[str, Any]:
    claim: dict[str, Any] = {
        "namespace": "spiffe",
        "node": {"name": "node-a", "uid": "node-uid-1"},
        "pod": {"name": "spiffe-agent-x7k2p", "uid": "pod-uid-1"},
        "serviceaccount": {"name": "spiffe-agent", "uid": "sa-uid-1"},
    }
    for name, value in changes.items():
        if value is None:
            claim.pop(name)
        else:
            claim[name] = value
    return claim


PAST = NOW - timedelta(minutes=1)
FUTURE = NOW + timedelta(minutes=5)

BAD_CLAIMS: list[tuple[str, dict[str, Any], str]] = [
    ("expired", {"exp": int(PAST.timestamp())}, f'k8s_psat token has expired: "{PAST.isoformat()}"'),
    ("not yet valid", {"nbf": int(FUTURE.timestamp())}, f'k8s_psat token is not valid yet: "{FUTURE.isoformat()}"'),
    (
        "issued in the future",
        {"iat": int(FUTURE.timestamp())},
        f'k8s_psat token was issued in the future: "{FUTURE.isoformat()}"',
    ),
    ("no exp", {"exp": None}, "k8s_psat token has no exp claim"),
    ("exp not a number", {"exp": "tomorrow"}, 'k8s_psat token claim exp is not a number: "tomorrow"'),
    ("exp a boolean", {"exp": True}, 'k8s_psat token claim exp is not a number: "True"'),
    (
        "exp out of range",
        {"exp": 10**30},
        'k8s_psat token claim exp is out of range: "1000000000000000000000000000000"',
    ),
    (
        "wrong audience",
        {"aud": ["kubernetes", "vault"]},
        'k8s_psat token audience is not one this server accepts (accepted: spiffe-server): "kubernetes, vault"',
    ),
    ("no audience", {"aud": None}, "k8s_psat token has no audience (aud claim)"),
    ("empty audience", {"aud": []}, "k8s_psat token has no audience (aud claim)"),
    (
        "no kubernetes claim",
        {"kubernetes__io": None},
        "k8s_psat token has no kubernetes.io claim: it is not a Kubernetes service account token",
    ),
    (
        "kubernetes claim not an object",
        {"kubernetes__io": "x"},
        "k8s_psat token claim token.kubernetes.io is not an object",
    ),
    (
        "no pod",
        {"kubernetes__io": _k8s(pod=None)},
        "k8s_psat token is not bound to a pod (no kubernetes.io.pod claim): use a projected service account token",
    ),
    (
        "no node (Kubernetes before 1.30)",
        {"kubernetes__io": _k8s(node=None)},
        "k8s_psat token is not bound to a node (no kubernetes.io.node claim): projected tokens carry the node from"
        " Kubernetes 1.30",
    ),
    (
        "no service account",
        {"kubernetes__io": _k8s(serviceaccount=None)},
        "k8s_psat token has no kubernetes.io.serviceaccount claim",
    ),
    (
        "no namespace",
        {"kubernetes__io": _k8s(namespace=None)},
        'k8s_psat token claim kubernetes.io.namespace is missing or malformed: "None"',
    ),
    (
        "node uid with a slash",
        {"kubernetes__io": _k8s(node={"name": "node-a", "uid": "../x"})},
        'k8s_psat token claim kubernetes.io.node.uid is missing or malformed: "../x"',
    ),
    (
        "pod name not a Kubernetes name",
        {"kubernetes__io": _k8s(pod={"name": "Pod A", "uid": "u"})},
        'k8s_psat token claim kubernetes.io.pod.name is missing or malformed: "Pod A"',
    ),
    (
        "node not an object",
        {"kubernetes__io": _k8s(node=["node-a"])},
        "k8s_psat token claim kubernetes.io.node is not an object",
    ),
    (
        "subject of another account",
        {"sub": "system:serviceaccount:spiffe:other"},
        "k8s_psat token subject is not its service account's (system:serviceaccount:spiffe:spiffe-agent):"
        ' "system:serviceaccount:spiffe:other"',
    ),
    (
        "service account not allowed",
        {
            "kubernetes__io": _k8s(serviceaccount={"name": "default", "uid": "u"}),
            "sub": "system:serviceaccount:spiffe:default",
        },
        f"k8s_psat service account is not allowed to attest agents in cluster '{CLUSTER}'"
        ' (service_account_allow_list): "spiffe:default"',
    ),
    (
        "namespace not allowed",
        {"kubernetes__io": _k8s(namespace="default"), "sub": "system:serviceaccount:default:spiffe-agent"},
        f"k8s_psat service account is not allowed to attest agents in cluster '{CLUSTER}'"
        ' (service_account_allow_list): "default:spiffe-agent"',
    ),
]


@pytest.mark.parametrize(("case", "overrides", "message"), BAD_CLAIMS, ids=[case for case, _, _ in BAD_CLAIMS])
async def test_bad_claims_are_refused_naming_the_rule(
    attestor: K8sPsatAttestor, issuer: Issuer, case: str, overrides: dict[str, Any], message: str
) -> None:
    token = issuer.token(POD, now=NOW, **overrides)
    assert await refused(attestor, payload_bytes(CLUSTER, token), secret=token) == f"attest: {message}"


async def test_a_token_signed_by_another_key_with_a_known_kid_is_refused(attestor: K8sPsatAttestor) -> None:
    impostor = Issuer("rsa", kid="rsa-1")
    token = impostor.token(Pod(), now=NOW)
    assert await refused(attestor, payload_bytes(CLUSTER, token), secret=token) == (
        "attest: k8s_psat token signature does not verify against the cluster's issuer key"
    )


async def test_a_token_with_an_unknown_kid_is_refused(attestor: K8sPsatAttestor) -> None:
    token = Issuer("rsa", kid="stranger").token(Pod(), now=NOW)
    assert await refused(attestor, payload_bytes(CLUSTER, token), secret=token) == (
        f"attest: k8s_psat token key ID is not among the issuer keys of cluster '{CLUSTER}': \"stranger\""
    )


async def test_alg_none_is_refused(attestor: K8sPsatAttestor, issuer: Issuer) -> None:
    claims = issuer.claims(Pod(), now=NOW)
    for header in ({"alg": "none", "kid": "rsa-1"}, {"alg": "None", "kid": "rsa-1"}, {"kid": "rsa-1"}):
        token = forged(header, claims)
        message = await refused(attestor, payload_bytes(CLUSTER, token), secret=token)
        assert message.startswith(
            "attest: k8s_psat token algorithm is not allowed (allowed: RS256, RS384, RS512, PS256"
        )


async def test_hs256_with_the_public_key_as_secret_is_refused(attestor: K8sPsatAttestor, issuer: Issuer) -> None:
    """The classic key-confusion attack: HMAC keyed with the issuer's public key, which anyone has."""
    public_pem = issuer.keys["rsa-1"][0].public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}
    claims = issuer.claims(Pod(), now=NOW)
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{_b64(signature)}"
    assert await refused(attestor, payload_bytes(CLUSTER, token), secret=token) == (
        "attest: k8s_psat token algorithm is not allowed (allowed: RS256, RS384, RS512, PS256, PS384, PS512,"
        ' ES256, ES384, ES512): "HS256"'
    )


async def test_an_algorithm_that_does_not_fit_the_key_is_refused(attestor: K8sPsatAttestor, issuer: Issuer) -> None:
    claims = issuer.claims(Pod(), now=NOW)
    for alg, kid, message in (
        ("ES256", "rsa-1", "k8s_psat token algorithm does not fit the issuer key 'rsa-1' (RSA key, alg RS256)"),
        ("PS256", "rsa-1", "k8s_psat token algorithm does not fit the issuer key 'rsa-1' (RSA key, alg RS256)"),
        ("ES384", "ec-1", "k8s_psat token algorithm does not fit the issuer key 'ec-1' (EC secp256r1 key, alg ES256)"),
        ("RS256", "ec-1", "k8s_psat token algorithm does not fit the issuer key 'ec-1' (EC secp256r1 key, alg ES256)"),
    ):
        token = forged({"alg": alg, "kid": kid}, claims, b"s" * 64)  # refused before its signature is read
        assert await refused(attestor, payload_bytes(CLUSTER, token), secret=token) == f'attest: {message}: "{alg}"'


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("not-a-jwt", "k8s_psat token is not a well-formed JWT"),
        ("a.b.c", "k8s_psat token is not a well-formed JWT"),
        (forged({"alg": "RS256"}, {}), "k8s_psat token header has no kid (key ID)"),
        (forged({"alg": "RS256", "kid": 7}, {}), "k8s_psat token is not a well-formed JWT"),
        (forged({"alg": "RS256", "kid": ""}, {}), "k8s_psat token header has no kid (key ID)"),
        (
            forged({"alg": "RS256", "kid": "rsa-1"}, {}, b"x" * 256),
            "k8s_psat token signature does not verify against the cluster's issuer key",
        ),
        ("[" * 3000 + "." + "e30" + ".", "k8s_psat token is not a well-formed JWT"),
        (_b64(b"[" * 5000) + ".e30.", "k8s_psat token is not a well-formed JWT"),
    ],
)
async def test_malformed_tokens_are_refused(attestor: K8sPsatAttestor, token: str, message: str) -> None:
    assert await refused(attestor, payload_bytes(CLUSTER, token)) == f"attest: {message}"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", 'k8s_psat payload is not JSON (expected {"cluster": ..., "token": ...})'),
        (b"eyJhbGciOi.x.y", 'k8s_psat payload is not JSON (expected {"cluster": ..., "token": ...})'),
        (b"\xff\xfe{}", 'k8s_psat payload is not JSON (expected {"cluster": ..., "token": ...})'),
        (b"[" * 10_000, 'k8s_psat payload is not JSON (expected {"cluster": ..., "token": ...})'),
        (b'["prod", "t"]', 'k8s_psat payload is not a JSON object (expected {"cluster": ..., "token": ...})'),
        (b'{"cluster": "prod-eu", "token": "t", "node": "x"}', 'k8s_psat payload has unknown keys: "node"'),
        (b'{"token": "t"}', "k8s_psat payload needs the cluster's name as a non-empty string"),
        (b'{"cluster": 5, "token": "t"}', "k8s_psat payload needs the cluster's name as a non-empty string"),
        (b'{"cluster": "prod-eu"}', "k8s_psat payload needs the token as a non-empty string"),
        (b'{"cluster": "prod-eu", "token": ""}', "k8s_psat payload needs the token as a non-empty string"),
        (
            b'{"cluster": "staging", "token": "t"}',
            'k8s_psat cluster is not one this server attests agents of: "staging"',
        ),
        (b"x" * (MAX_PAYLOAD_BYTES + 1), f'k8s_psat payload is larger than {MAX_PAYLOAD_BYTES} bytes: "16385"'),
    ],
)
async def test_malformed_payloads_are_refused(attestor: K8sPsatAttestor, payload: bytes, message: str) -> None:
    assert await refused(attestor, payload) == f"attest: {message}"


async def test_a_huge_token_is_refused_before_it_is_parsed(attestor: K8sPsatAttestor, issuer: Issuer) -> None:
    token = issuer.token(Pod(), now=NOW, padding="x" * MAX_PAYLOAD_BYTES)
    assert await refused(attestor, payload_bytes(CLUSTER, token), secret=token) == (
        f'attest: k8s_psat payload is larger than {MAX_PAYLOAD_BYTES} bytes: "{len(payload_bytes(CLUSTER, token))}"'
    )


async def test_an_unknown_cluster_is_refused_before_any_key_is_loaded(issuer: Issuer, tmp_path: Path) -> None:
    keys = KeyCache(JWKSFile(tmp_path / "absent.json"))
    policy = ClusterPolicy.build(CLUSTER, allow_list=ALLOWED, audience=("spiffe-server",))
    attestor = K8sPsatAttestor(trust_domain=TD, clusters=[Cluster(policy=policy, keys=keys)], clock=lambda: NOW)
    token = issuer.token(Pod(), now=NOW)
    assert await refused(attestor, payload_bytes("other", token), secret=token) == (
        'attest: k8s_psat cluster is not one this server attests agents of: "other"'
    )
    assert keys.loads == 0
    # the cluster's keys cannot be read: the agent learns that, the server's log learns why
    assert await refused(attestor, payload_bytes(CLUSTER, token), secret=token) == (
        f"attest: k8s_psat issuer keys of cluster '{CLUSTER}' are unavailable (the server's log says why)"
    )


# --- the policy's own checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "a/b"}, "k8s_psat cluster name must be 1 to 128 letters, digits, '.', '_' or '-'"),
        ({"name": ".."}, "k8s_psat cluster name must be"),
        ({"allow_list": ()}, "k8s_psat cluster 'c' must allow at least one service account"),
        ({"allow_list": ("spiffe",)}, "service_account_allow_list entries must be NAMESPACE:SERVICE_ACCOUNT: 'spiffe'"),
        ({"allow_list": ("Spiffe:agent",)}, "service_account_allow_list entries must be NAMESPACE:SERVICE_ACCOUNT"),
        ({"audience": ()}, "k8s_psat cluster 'c' needs at least one non-empty audience"),
        ({"audience": ("",)}, "k8s_psat cluster 'c' needs at least one non-empty audience"),
    ],
)
def test_cluster_policies_are_checked(options: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"name": "c", "allow_list": ("ns:sa",), "audience": ("spiffe-server",), **options}
    name = arguments.pop("name")
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        ClusterPolicy.build(name, **arguments)


def test_allow_list_entries_parse() -> None:
    assert parse_service_account("kube-system:spiffe-agent.v2") == ("kube-system", "spiffe-agent.v2")


def test_evidence_never_shows_its_token() -> None:
    assert repr(Evidence(cluster="c", token="secret-token")) == "Evidence(cluster='c', token=<12 characters>)"
