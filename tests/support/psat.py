"""A test Kubernetes service account issuer: keys, its JWK Set, and projected tokens it signs.

Tokens look like those the kubelet projects into a pod (Kubernetes 1.30+): ``iss``, ``sub``,
``aud``, ``exp``, ``iat``, ``nbf``, ``jti`` and the ``kubernetes.io`` claim with the namespace,
service account, pod and node. :meth:`Issuer.token` takes overrides (``None`` removes a claim).
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER: Final = "https://kubernetes.default.svc.cluster.local"
NAMESPACE: Final = "spiffe"
SERVICE_ACCOUNT: Final = "spiffe-agent"

KeyKind = Literal["rsa", "ec-p256", "ec-p384"]
_ALGORITHM: Final[Mapping[str, str]] = {"rsa": "RS256", "ec-p256": "ES256", "ec-p384": "ES384"}


def new_signing_key(kind: KeyKind) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1() if kind == "ec-p256" else ec.SECP384R1())


@dataclass(frozen=True)
class Pod:
    """The pod (and node) a token is bound to."""

    name: str = "spiffe-agent-x7k2p"
    node_name: str = "node-a"
    namespace: str = NAMESPACE
    service_account: str = SERVICE_ACCOUNT
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    node_uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    service_account_uid: str = field(default_factory=lambda: str(uuid.uuid4()))


class Issuer:
    """Signing keys by key ID; the first is the one tokens are signed with unless told otherwise."""

    def __init__(self, kind: KeyKind = "rsa", *, kid: str | None = None) -> None:
        self.keys: dict[str, tuple[rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, str]] = {}
        self.current = self.add_key(kind, kid=kid)

    def add_key(self, kind: KeyKind, *, kid: str | None = None) -> str:
        kid = kid or uuid.uuid4().hex[:16]
        self.keys[kid] = (new_signing_key(kind), _ALGORITHM[kind])
        return kid

    def rotate(self, kind: KeyKind = "rsa") -> str:
        """A new current key; the old ones stay published."""
        self.current = self.add_key(kind)
        return self.current

    def jwks(self, *, only: tuple[str, ...] | None = None) -> bytes:
        """The JWK Set of the public keys, as Kubernetes publishes it (``use: sig``, ``alg``, ``kid``)."""
        keys = []
        for kid, (key, algorithm) in self.keys.items():
            if only is not None and kid not in only:
                continue
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[algorithm].to_jwk(key.public_key()))
            keys.append({**jwk, "use": "sig", "alg": algorithm, "kid": kid})
        return json.dumps({"keys": keys}).encode()

    def claims(self, pod: Pod, *, now: datetime, lifetime: timedelta = timedelta(minutes=10)) -> dict[str, Any]:
        issued = int(now.timestamp())
        return {
            "aud": ["spiffe-server"],
            "exp": issued + int(lifetime.total_seconds()),
            "iat": issued,
            "nbf": issued,
            "iss": ISSUER,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": pod.namespace,
                "node": {"name": pod.node_name, "uid": pod.node_uid},
                "pod": {"name": pod.name, "uid": pod.uid},
                "serviceaccount": {"name": pod.service_account, "uid": pod.service_account_uid},
            },
            "sub": f"system:serviceaccount:{pod.namespace}:{pod.service_account}",
        }

    def token(
        self,
        pod: Pod,
        *,
        now: datetime,
        kid: str | None = None,
        lifetime: timedelta = timedelta(minutes=10),
        **overrides: Any,
    ) -> str:
        """A signed token for ``pod``; ``overrides`` replace claims (``None`` removes one)."""
        kid = kid or self.current
        key, algorithm = self.keys[kid]
        claims = self.claims(pod, now=now, lifetime=lifetime)
        for keyword, value in overrides.items():
            name = keyword.replace("__", ".")  # kubernetes__io -> kubernetes.io
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})


class JWKSServer:
    """An issuer's JWKS endpoint on 127.0.0.1 (HTTP, or HTTPS with ``tls``), in a thread.

    ``body`` and ``status`` are what it answers (change them at will); ``requests`` counts the
    GETs and ``authorizations`` records their Authorization headers; ``redirect_to`` answers 302.
    """

    def __init__(self, body: bytes, *, tls: ssl.SSLContext | None = None) -> None:
        self.body = body
        self.status = 200
        self.redirect_to: str | None = None
        self.requests = 0
        self.authorizations: list[str | None] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                owner.authorizations.append(self.headers.get("Authorization"))
                if owner.redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", owner.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        host = "localhost" if tls is not None else "127.0.0.1"  # an HTTPS certificate names localhost
        self.url = f"{'https' if tls is not None else 'http'}://{host}:{self.port}/openid/v1/jwks"
        self._thread = threading.Thread(target=self._server.serve_forever, name="jwks-server", daemon=True)

    def __enter__(self) -> JWKSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
