"""Issuer keys for k8s_psat: JWK Sets parsed, cached, reloaded from a file and from a real HTTP(S) server."""

from __future__ import annotations

import json
import re
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from jwt.algorithms import ECAlgorithm

from controlplane.attest.base import AttestationError
from controlplane.attest.jwks import (
    JWKSURL,
    MAX_JWKS_BYTES,
    JWKSError,
    JWKSFile,
    KeyCache,
    UnknownKeyError,
    check_jwks_url,
    parse_jwks,
)
from controlplane.attest.k8s_psat import Cluster, ClusterPolicy, K8sPsatAttestor, payload_bytes
from spiffecore import TrustDomain
from tests.support.ca import TestCA
from tests.support.psat import Issuer, JWKSServer, Pod


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer("ec-p256", kid="k1")


# --- parsing ----------------------------------------------------------------------------------


def test_a_kubernetes_jwks_parses_by_kid() -> None:
    issuer = Issuer("rsa", kid="rsa")
    issuer.add_key("ec-p256", kid="p256")
    issuer.add_key("ec-p384", kid="p384")
    keys = parse_jwks(issuer.jwks())
    assert sorted(keys) == ["p256", "p384", "rsa"]
    assert keys["rsa"].fits("RS256")
    assert keys["rsa"].kind == "RSA"
    assert not keys["rsa"].fits("PS256")  # its JWK pins RS256
    assert keys["p256"].fits("ES256")
    assert not keys["p256"].fits("ES384")
    assert keys["p384"].fits("ES384")


def test_keys_without_alg_fit_every_algorithm_of_their_type(issuer: Issuer) -> None:
    jwk = json.loads(issuer.jwks())["keys"][0]
    del jwk["alg"], jwk["use"]
    key = parse_jwks(json.dumps({"keys": [jwk]}).encode())["k1"]
    assert key.fits("ES256")
    assert not key.fits("RS256")
    assert not key.fits("HS256")
    assert not key.fits("none")


def test_unusable_keys_are_ignored_and_a_set_of_none_is_refused(issuer: Issuer) -> None:
    good = json.loads(issuer.jwks())["keys"][0]
    ignored: list[Any] = [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},  # symmetric: never
        {**good, "kid": "enc", "use": "enc"},
        {**good, "kid": "hs", "alg": "HS256"},
        {**good, "kid": None},
        {key: value for key, value in good.items() if key != "kid"},
        {**good, "kid": "broken", "x": "AAAA"},
        {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "ed"},
        "not an object",
    ]
    keys = parse_jwks(json.dumps({"keys": [*ignored, good]}).encode())
    assert list(keys) == ["k1"]
    with pytest.raises(JWKSError) as caught:
        parse_jwks(json.dumps({"keys": ignored}).encode())
    assert str(caught.value) == (
        "jwks: the JWK Set holds no usable signing key (RSA or EC with a kid; 8 keys were ignored)"
    )


def test_a_jwks_with_a_private_key_yields_only_the_public_part() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(private))
    key = parse_jwks(json.dumps({"keys": [{**jwk, "kid": "k"}]}).encode())["k"]
    assert key.key.public_numbers() == private.public_key().public_numbers()
    assert "Private" not in type(key.key).__name__


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "jwks: the JWK Set is not JSON"),
        (b"\xff", "jwks: the JWK Set is not JSON"),
        (b"[" * 100_000, "jwks: the JWK Set is not JSON"),
        (b"[]", 'jwks: the JWK Set is not a JSON object with a "keys" list'),
        (b'{"keys": {}}', 'jwks: the JWK Set is not a JSON object with a "keys" list'),
        (b'{"keys": []}', "jwks: the JWK Set holds no usable signing key (RSA or EC with a kid; 0 keys were ignored)"),
        (b" " * (MAX_JWKS_BYTES + 1), f'jwks: the JWK Set is larger than {MAX_JWKS_BYTES} bytes: "1048577"'),
    ],
)
def test_malformed_sets_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(JWKSError) as caught:
        parse_jwks(data)
    assert str(caught.value) == message


def test_two_keys_with_one_kid_are_ambiguous(issuer: Issuer) -> None:
    other = Issuer("ec-p256", kid="k1")
    keys = json.loads(issuer.jwks())["keys"] + json.loads(other.jwks())["keys"]
    with pytest.raises(JWKSError) as caught:
        parse_jwks(json.dumps({"keys": keys}).encode())
    assert str(caught.value) == 'jwks: the JWK Set has two keys with one key ID: "k1"'


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.org/jwks", "jwks_url must be an https:// URL with a host"),
        ("file:///etc/jwks.json", "jwks_url must be an https:// URL with a host"),
        ("https:///jwks", "jwks_url must be an https:// URL with a host"),
        ("http://issuer.example/jwks", "jwks_url must use https (plain http only to a loopback address)"),
        ("http://10.0.0.1/jwks", "jwks_url must use https (plain http only to a loopback address)"),
        ("https://user:pw@issuer.example/jwks", "jwks_url must not carry user information"),
        ("https://issuer.example/jwks#k", "jwks_url must not have a fragment"),
        ("https://issuer.example:99999/jwks", "jwks_url is not a URL"),
    ],
)
def test_jwks_urls_must_be_https_except_on_loopback(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        check_jwks_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://kubernetes.default.svc/openid/v1/jwks",
        "http://127.0.0.1:8080/k",
        "http://[::1]/k",
        "http://localhost/k",
    ],
)
def test_good_jwks_urls(url: str) -> None:
    assert check_jwks_url(url) == url


# --- the cache over a file --------------------------------------------------------------------------


def test_a_file_is_reloaded_when_stale_and_on_an_unknown_kid_at_most_every_interval(tmp_path: Path) -> None:
    issuer = Issuer("ec-p256", kid="old")
    path = tmp_path / "jwks.json"
    path.write_bytes(issuer.jwks())
    clock = Clock()
    cache = KeyCache(JWKSFile(path), max_age=300, min_interval=10, clock=clock)
    assert cache.key("old").kid == "old"
    assert cache.loads == 1
    issuer.rotate("ec-p256")
    path.write_bytes(issuer.jwks(only=(issuer.current,)))  # the old key is withdrawn
    clock.now += 60
    # an unknown kid loads again at once (the issuer rotated) ...
    assert cache.key(issuer.current).kid == issuer.current
    assert cache.loads == 2
    # ... and again only after min_interval, however many made-up kids arrive
    for kid in ("made-up-1", "made-up-2", "old"):
        with pytest.raises(UnknownKeyError):
            cache.key(kid)
    assert cache.loads == 2
    clock.now += 10
    with pytest.raises(UnknownKeyError) as caught:
        cache.key("made-up-3")
    assert str(caught.value) == 'jwks: no issuer key has this key ID: "made-up-3"'
    assert cache.loads == 3


def test_stale_keys_are_reloaded_and_kept_while_the_source_fails(tmp_path: Path) -> None:
    issuer = Issuer("ec-p256", kid="k")
    path = tmp_path / "jwks.json"
    path.write_bytes(issuer.jwks())
    clock = Clock()
    cache = KeyCache(JWKSFile(path), max_age=300, min_interval=10, clock=clock)
    cache.key("k")
    path.write_bytes(b"garbage")
    clock.now += 300
    assert cache.key("k").kid == "k"  # the reload failed: the keys held stay in use
    assert cache.loads == 2
    assert cache.key("k").kid == "k"  # and the failing source is not asked again before min_interval
    assert cache.loads == 2
    issuer.rotate("ec-p256")
    path.write_bytes(issuer.jwks(only=(issuer.current,)))
    clock.now += 10
    with pytest.raises(UnknownKeyError):
        cache.key("k")  # withdrawn by the issuer: no longer trusted
    assert cache.loads == 3


def test_with_no_keys_ever_loaded_the_failure_is_the_answer_and_is_rate_limited(tmp_path: Path) -> None:
    clock = Clock()
    cache = KeyCache(JWKSFile(tmp_path / "absent.json"), min_interval=10, clock=clock)
    for _ in range(3):
        with pytest.raises(JWKSError) as caught:
            cache.key("k")
        assert str(caught.value) == (
            f'jwks: cannot read the JWK Set file (No such file or directory): "{tmp_path / "absent.json"}"'
        )
    assert cache.loads == 1
    with pytest.raises(JWKSError):
        cache.load()  # an explicit load (at start-up) always tries
    assert cache.loads == 2


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(b" " * (MAX_JWKS_BYTES + 1))
    with pytest.raises(JWKSError, match="the JWK Set file is larger than 1048576 bytes"):
        KeyCache(JWKSFile(path)).load()


# --- the cache over a URL, against a real local server ------------------------------------------------


async def test_kid_rotation_through_a_local_http_server() -> None:
    """The issuer rotates its key; the next token names the new kid, and the attestor fetches it."""
    issuer = Issuer("rsa", kid="before")
    pod = Pod()
    now = datetime.now(UTC)
    with JWKSServer(issuer.jwks()) as server:
        clock = Clock()
        keys = KeyCache(JWKSURL(server.url, timeout=5), clock=clock)
        policy = ClusterPolicy.build("c1", allow_list=["spiffe:spiffe-agent"], audience=["spiffe-server"])
        attestor = K8sPsatAttestor(
            trust_domain=TrustDomain.parse("example.org"),
            clusters=[Cluster(policy=policy, keys=keys)],
            clock=lambda: datetime.now(UTC),
        )
        first = await attestor.attest(payload_bytes("c1", issuer.token(pod, now=now)), NoChallenges())
        assert server.requests == 1
        await attestor.attest(payload_bytes("c1", issuer.token(pod, now=now)), NoChallenges())
        assert server.requests == 1  # cached
        issuer.rotate("ec-p256")
        server.body = issuer.jwks()
        clock.now += 30
        second = await attestor.attest(payload_bytes("c1", issuer.token(pod, now=now)), NoChallenges())
        assert server.requests == 2
        assert first.agent_id == second.agent_id
        assert server.authorizations == [None, None]
        # a made-up kid right after: no new fetch (rate-limited), a clear refusal
        stranger = Issuer("rsa", kid="made-up").token(pod, now=now)
        with pytest.raises(
            AttestationError, match="k8s_psat token key ID is not among the issuer keys of cluster 'c1'"
        ):
            await attestor.attest(payload_bytes("c1", stranger), NoChallenges())
        assert server.requests == 2


class NoChallenges:
    async def challenge(self, challenge: bytes) -> bytes:
        raise AssertionError("k8s_psat sends no challenge")


def test_http_errors_redirects_and_oversized_answers_are_refused(issuer: Issuer) -> None:
    with JWKSServer(issuer.jwks()) as server:
        source = JWKSURL(server.url, timeout=5)
        server.status = 403
        with pytest.raises(JWKSError) as caught:
            source.load()
        assert str(caught.value) == f'jwks: the JWKS URL answered HTTP 403: "{server.url}"'
        server.status = 200
        server.redirect_to = "http://127.0.0.1:1/elsewhere"
        with pytest.raises(JWKSError) as caught:
            source.load()
        assert str(caught.value) == f'jwks: the JWKS URL answered HTTP 302: "{server.url}"'
        server.redirect_to = None
        server.body = b" " * (MAX_JWKS_BYTES + 10)
        with pytest.raises(JWKSError) as caught:
            source.load()
        assert str(caught.value) == f'jwks: the JWKS URL answered with more than {MAX_JWKS_BYTES} bytes: "{server.url}"'
    with pytest.raises(JWKSError, match=r'^jwks: cannot fetch the JWKS URL \(.*Connection refused.*\): "http://127'):
        source.load()


def test_https_with_a_ca_file_and_a_bearer_token_read_afresh(issuer: Issuer, tmp_path: Path) -> None:
    """As from the Kubernetes API server: its CA, and the server's own service account token."""
    ca = TestCA.create("issuer.test")
    leaf = ca.mint(uris=[], dns_names=["localhost"])
    cert_file = tmp_path / "server.pem"
    cert_file.write_bytes(
        leaf.leaf.public_bytes(Encoding.PEM) + leaf.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert.public_bytes(Encoding.PEM))
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    with JWKSServer(issuer.jwks(), tls=context) as server:
        source = JWKSURL(server.url, timeout=5, ca_file=ca_file, token_file=token_file)
        assert list(parse_jwks(source.load())) == ["k1"]
        token_file.write_text("rotated-token")
        source.load()
        assert server.authorizations == ["Bearer first-token", "Bearer rotated-token"]
        untrusted = JWKSURL(server.url, timeout=5)  # the system's roots do not know the test CA
        with pytest.raises(JWKSError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusted.load()
        token_file.write_text("not a token\n")
        with pytest.raises(JWKSError) as caught:
            source.load()
        assert str(caught.value) == f'jwks: the JWKS bearer token file does not hold a token: "{token_file}"'
        assert server.authorizations == ["Bearer first-token", "Bearer rotated-token"]  # nothing sent


def test_a_bad_ca_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    path.write_text("not PEM")
    with pytest.raises(JWKSError, match=r"^jwks: cannot load the JWKS CA file"):
        JWKSURL("https://localhost/jwks", ca_file=path)
