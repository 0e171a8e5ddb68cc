"""The agent's own identity: bootstrap trust, attest the node, persist, renew, re-attest.

**Start.** :func:`load_or_attest` first looks in the data directory for the agent SVID, its key
and the trust bundle a previous run left there (``agent-svid.pem`` and ``agent-key.pem``, both
0600, and ``bundle.json``). If they are there and the SVID is still valid, the agent resumes with
them: a restart needs no new join token. Otherwise it attests, with a join token, by x509pop
(proof of possession of a node certificate's key) or by k8s_psat (the pod's projected service
account token, read afresh from its file at every attestation since the kubelet rotates it), and
persists the result.

**Trust bootstrap.** To attest, the agent must trust the server. It uses, in this order: the
bundle a previous run persisted; the ``trust_bundle`` file (PEM roots); or, with
``insecure_bootstrap``, trust on first use: it opens a TLS connection without verification, takes
the last certificate of the chain the server presents, which must be a self-signed CA certificate
with the URI SAN ``spiffe://<trust domain>`` (the server ends its chain with its root), and trusts
that, logging a loud warning with its SHA-256 fingerprint for the operator to compare. After
attestation, the bundle the server sent replaces it and is persisted.

**Renewal.** :meth:`AgentNode.maintain` renews the agent SVID at its rotation time (half its life,
give or take a tenth: :mod:`sidecar.agent.rotation`) with a new key each time, and persists it.
While the server is away it retries with backoff. If the SVID expires meanwhile, an agent that can
attest again by itself (x509pop, k8s_psat) does so; one that cannot (a join token is single-use)
logs that a new token is needed and keeps serving what its cache holds until those SVIDs expire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import socket
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, NoReturn

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from sidecar.agent import rotation
from sidecar.agent.config import DEFAULT_PSAT_TOKEN_PATH
from sidecar.agent.serverapi import (
    ATTESTATION_CLIENT_CERT_PEM,
    ATTESTATION_CLIENT_KEY_PEM,
    DEFAULT_TIMEOUT,
    JOIN_TOKEN,
    K8S_PSAT,
    SERVER_DNS_NAME,
    X509POP,
    AgentAPIClient,
    AgentIdentity,
    ServerAPIError,
    attest,
    generate_key,
    k8s_psat_payload,
    x509pop_answerer,
    x509pop_payload,
)
from spiffecore import X509SVID, PrivateKey, SpiffeBundle, SpiffeError, TrustDomain, X509Bundle
from spiffecore.der import dump_pem_certificates
from spiffecore.tls import peer_chain, private_pem_file
from spiffeops.lifecycle import write_atomically

logger = logging.getLogger("sidecar.agent.node")

AGENT_SVID_FILE: Final = "agent-svid.pem"
AGENT_KEY_FILE: Final = "agent-key.pem"
BUNDLE_FILE: Final = "bundle.json"
PUBLIC_MODE: Final = 0o644
PRIVATE_MODE: Final = 0o600
# The server refuses k8s_psat payloads above 16 KiB; a Kubernetes token is about 1 KiB.
MAX_PSAT_TOKEN_BYTES: Final = 15 * 1024


class NodeError(SpiffeError):
    """The agent cannot establish its own identity (configuration, persisted state, attestation)."""

    layer = "node"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class NodeSettings:
    """How the agent reaches the server, trusts it, attests and where it keeps its identity.

    ``trust_bundle`` (a PEM file of the trust domain's roots) and ``insecure_bootstrap`` are
    needed only for the first start: later starts trust the bundle persisted in ``data_dir``.
    Attestation uses ``join_token``, ``x509pop_cert`` (a PEM chain, leaf first) with
    ``x509pop_key``, or ``k8s_psat_cluster`` with the token at ``k8s_psat_token_path``; x509pop and
    k8s_psat let the agent attest again by itself.
    """

    server_address: str
    trust_domain: TrustDomain
    data_dir: Path
    trust_bundle: Path | None = None
    insecure_bootstrap: bool = False
    join_token: str | None = dataclasses.field(default=None, repr=False)
    x509pop_cert: Path | None = None
    x509pop_key: Path | None = None
    k8s_psat_cluster: str | None = None
    k8s_psat_token_path: Path = DEFAULT_PSAT_TOKEN_PATH
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.trust_bundle is not None and self.insecure_bootstrap:
            raise ValueError("node: trust_bundle and insecure_bootstrap exclude each other; set one")
        if (self.x509pop_cert is None) != (self.x509pop_key is None):
            raise ValueError("node: x509pop needs both x509pop_cert and x509pop_key")
        if self.join_token is not None and self.x509pop_cert is not None:
            raise ValueError("node: join_token and x509pop exclude each other; set one")
        if self.join_token is not None and not self.join_token:
            raise ValueError("node: join_token must not be empty")
        if self.k8s_psat_cluster is not None and (self.join_token is not None or self.x509pop_cert is not None):
            raise ValueError("node: k8s_psat excludes join_token and x509pop; set one")
        if self.k8s_psat_cluster is not None and not self.k8s_psat_cluster:
            raise ValueError("node: k8s_psat_cluster must not be empty")

    @property
    def can_reattest(self) -> bool:
        """Whether the agent can attest again without an operator (x509pop, k8s_psat; a join token is single-use)."""
        return self.x509pop_cert is not None or self.k8s_psat_cluster is not None

    @property
    def attestation_type(self) -> str | None:
        """The node attestor configured, if any."""
        if self.x509pop_cert is not None:
            return X509POP
        if self.k8s_psat_cluster is not None:
            return K8S_PSAT
        return JOIN_TOKEN if self.join_token is not None else None


# --- persisted state -----------------------------------------------------------------------------


def load_persisted_bundle(settings: NodeSettings) -> SpiffeBundle | None:
    """The bundle a previous run persisted, or ``None``. A damaged file is a :class:`NodeError`."""
    path = settings.data_dir / BUNDLE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return SpiffeBundle.parse(settings.trust_domain, data)
    except SpiffeError as err:
        raise NodeError(
            f"the persisted bundle cannot be read ({err}); remove it to bootstrap again", str(path)
        ) from err


def load_persisted_svid(settings: NodeSettings) -> X509SVID | None:
    """The agent SVID a previous run persisted, or ``None`` (missing, unreadable: both logged)."""
    svid_path = settings.data_dir / AGENT_SVID_FILE
    key_path = settings.data_dir / AGENT_KEY_FILE
    try:
        chain_pem = svid_path.read_bytes()
        key_pem = key_path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        svid = X509SVID.load_pem(chain_pem, key_pem)
    except SpiffeError as err:
        logger.warning("the persisted agent SVID cannot be used; attesting again", extra={"error": str(err)})
        return None
    if svid.id.trust_domain != settings.trust_domain:
        logger.warning(
            "the persisted agent SVID is of another trust domain; attesting again", extra={"spiffe_id": str(svid.id)}
        )
        return None
    return svid


def save_svid(data_dir: Path, svid: X509SVID) -> None:
    """Persist the agent SVID and its key (both 0600; the key first, then the chain)."""
    write_atomically(data_dir / AGENT_KEY_FILE, svid.private_key_pem(), mode=PRIVATE_MODE)
    write_atomically(data_dir / AGENT_SVID_FILE, svid.cert_chain_pem(), mode=PRIVATE_MODE)


def save_bundle(data_dir: Path, bundle: SpiffeBundle) -> None:
    write_atomically(data_dir / BUNDLE_FILE, bundle.to_json(), mode=PUBLIC_MODE)


def _prepare_data_dir(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


# --- trust bootstrap ------------------------------------------------------------------------------


def fingerprint(certificate: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint, as ``AB:CD:...``."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise NodeError("the server address must be host:port", address)
    return host.removeprefix("[").removesuffix("]"), int(port)


def fetch_server_root(address: str, trust_domain: TrustDomain, *, timeout: float = DEFAULT_TIMEOUT) -> x509.Certificate:
    """Trust on first use: the root at the end of the chain the server at ``address`` presents.

    Blocking. The connection is NOT verified: whoever answers at ``address`` chooses the
    certificate. The result must be a self-signed CA certificate whose URI SAN is the trust
    domain's ID, else :class:`NodeError`.
    """
    host, port = _split_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    # The server asks every client for a certificate; the public attestation certificate it is.
    with private_pem_file(ATTESTATION_CLIENT_CERT_PEM + ATTESTATION_CLIENT_KEY_PEM) as path:
        context.load_cert_chain(path)
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=SERVER_DNS_NAME) as connection,
        ):
            chain = peer_chain(connection)
    except OSError as err:  # ssl.SSLError is an OSError
        raise NodeError(f"insecure bootstrap: cannot reach the server ({err})", address) from err
    if not chain:
        raise NodeError("insecure bootstrap: the server presented no certificate", address)
    root = chain[-1]
    problem = _root_problem(root, trust_domain)
    if problem is not None:
        raise NodeError(
            f"insecure bootstrap: the last certificate the server presents must be a self-signed CA certificate"
            f" with URI SAN {trust_domain.id_string()}, and it is not ({problem}); bootstrap from a trust_bundle"
            f" file instead",
            address,
        )
    return root


def _root_problem(certificate: x509.Certificate, trust_domain: TrustDomain) -> str | None:
    if certificate.issuer != certificate.subject:
        return "its issuer is not its subject"
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as err:
        return f"it is not signed by its own key: {err or type(err).__name__}"
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "it has no basic constraints"
    if not constraints.ca:
        return "it is not a CA certificate"
    try:
        uris = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound:
        uris = []
    if uris != [trust_domain.id_string()]:
        return f"its URI SANs are {uris}"
    return None


async def bootstrap_roots(settings: NodeSettings) -> bytes:
    """The PEM roots to trust the server by for a first attestation: the file, or trust on first use."""
    if settings.trust_bundle is not None:
        try:
            data = settings.trust_bundle.read_bytes()
            bundle = X509Bundle.load_pem(settings.trust_domain, data)
        except OSError as err:
            raise NodeError(f"cannot read the trust bundle ({err.strerror})", str(settings.trust_bundle)) from err
        except SpiffeError as err:
            raise NodeError(f"the trust bundle is not PEM certificates ({err})", str(settings.trust_bundle)) from err
        if not bundle.authorities:
            raise NodeError("the trust bundle holds no certificate", str(settings.trust_bundle))
        return bundle.pem()
    if settings.insecure_bootstrap:
        root = await asyncio.to_thread(
            fetch_server_root, settings.server_address, settings.trust_domain, timeout=settings.timeout
        )
        logger.warning(
            "INSECURE BOOTSTRAP: trusting the server's root certificate on first use, WITHOUT verification;"
            " compare its SHA-256 fingerprint with the server's (spiffe-server bundle show) and use a"
            " trust_bundle file instead wherever you can",
            extra={
                "server": settings.server_address,
                "sha256": fingerprint(root),
                "subject": root.subject.rfc4514_string(),
            },
        )
        return dump_pem_certificates((root,))
    raise NodeError(
        "the agent has no persisted bundle and no way to trust the server: set trust_bundle (or insecure_bootstrap)",
        str(settings.data_dir),
    )


# --- attestation -----------------------------------------------------------------------------------


def _x509pop_credentials(settings: NodeSettings) -> tuple[tuple[x509.Certificate, ...], PrivateKey]:
    assert settings.x509pop_cert is not None
    assert settings.x509pop_key is not None
    try:
        chain = tuple(x509.load_pem_x509_certificates(settings.x509pop_cert.read_bytes()))
    except OSError as err:
        raise NodeError(f"cannot read the x509pop certificate ({err.strerror})", str(settings.x509pop_cert)) from err
    except ValueError as err:
        raise NodeError(f"the x509pop certificate is not PEM ({err})", str(settings.x509pop_cert)) from err
    try:
        key = load_pem_private_key(settings.x509pop_key.read_bytes(), password=None)
    except OSError as err:
        raise NodeError(f"cannot read the x509pop key ({err.strerror})", str(settings.x509pop_key)) from err
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise NodeError("the x509pop key is not an unencrypted PEM private key", str(settings.x509pop_key)) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise NodeError("the x509pop key is of an unsupported type", type(key).__name__)
    return chain, key


def read_psat_token(path: Path) -> str:
    """The projected service account token in ``path``, read now (the kubelet replaces it as it rotates)."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_PSAT_TOKEN_BYTES + 1)
    except OSError as err:
        raise NodeError(f"cannot read the k8s_psat token ({err.strerror or err})", str(path)) from err
    if len(data) > MAX_PSAT_TOKEN_BYTES:
        raise NodeError(f"the k8s_psat token file is larger than {MAX_PSAT_TOKEN_BYTES} bytes", str(path))
    token = data.strip()
    if not token:
        raise NodeError("the k8s_psat token file is empty", str(path))
    if not all(0x21 <= byte <= 0x7E for byte in token):
        raise NodeError("the k8s_psat token file does not hold a token (a JWT is printable ASCII)", str(path))
    return token.decode("ascii")


async def attest_node(settings: NodeSettings, roots_pem: bytes) -> AgentIdentity:
    """Attest with the configured join token, x509pop credentials or k8s_psat token, trusting ``roots_pem``."""
    if settings.k8s_psat_cluster is not None:
        token = read_psat_token(settings.k8s_psat_token_path)
        try:
            identity = await attest(
                settings.server_address,
                roots_pem=roots_pem,
                attestation_type=K8S_PSAT,
                payload=k8s_psat_payload(settings.k8s_psat_cluster, token),
                timeout=settings.timeout,
            )
        except ServerAPIError as err:
            if err.code is grpc.StatusCode.PERMISSION_DENIED:
                raise NodeError(
                    f"the server refused the k8s_psat token of {settings.k8s_psat_token_path} for cluster"
                    f" {settings.k8s_psat_cluster!r} ({err.message})"
                ) from err
            raise
    elif settings.x509pop_cert is not None:
        chain, key = _x509pop_credentials(settings)
        identity = await attest(
            settings.server_address,
            roots_pem=roots_pem,
            attestation_type=X509POP,
            payload=x509pop_payload(chain),
            answer_challenge=x509pop_answerer(key),
            timeout=settings.timeout,
        )
    elif settings.join_token is not None:
        try:
            identity = await attest(
                settings.server_address,
                roots_pem=roots_pem,
                attestation_type=JOIN_TOKEN,
                payload=settings.join_token.encode(),
                timeout=settings.timeout,
            )
        except ServerAPIError as err:
            if err.code is grpc.StatusCode.PERMISSION_DENIED:
                raise NodeError(
                    "the join token was refused: it is unknown, expired or already used (a token attests one"
                    " agent once); generate a new one with 'spiffe-server token generate' and start the agent"
                    f" with it ({err.message})"
                ) from err
            raise
    else:
        raise NodeError(
            "the agent has no valid SVID to resume with and no way to attest: configure join_token, x509pop or"
            " k8s_psat",
            str(settings.data_dir),
        )
    if identity.svid.id.trust_domain != settings.trust_domain:
        raise NodeError(f"the server attested the agent into another trust domain ({identity.svid.id})")
    return identity


async def load_or_attest(settings: NodeSettings, *, clock: Callable[[], datetime] = _utcnow) -> AgentIdentity:
    """The agent's identity: the persisted one while its SVID is valid, else a new attestation (persisted)."""
    _prepare_data_dir(settings.data_dir)
    bundle = load_persisted_bundle(settings)
    svid = load_persisted_svid(settings)
    if bundle is not None and svid is not None:
        now = clock()
        if svid.issued_at <= now < svid.expires_at:
            logger.info(
                "resuming with the persisted agent SVID",
                extra={"spiffe_id": str(svid.id), "expires_at": svid.expires_at.isoformat()},
            )
            return AgentIdentity(svid=svid, bundle=bundle, can_reattest=settings.can_reattest)
        logger.warning(
            "the persisted agent SVID has expired; attesting again",
            extra={"spiffe_id": str(svid.id), "expired_at": svid.expires_at.isoformat()},
        )
    roots_pem = (
        dump_pem_certificates(bundle.x509.authorities) if bundle is not None else await bootstrap_roots(settings)
    )
    identity = await attest_node(settings, roots_pem)
    save_svid(settings.data_dir, identity.svid)
    save_bundle(settings.data_dir, identity.bundle)
    logger.info(
        "attested",
        extra={"spiffe_id": str(identity.svid.id), "expires_at": identity.svid.expires_at.isoformat()},
    )
    return identity


# --- renewal ------------------------------------------------------------------------------------------


class AgentNode:
    """The agent's identity while it runs: renewed, persisted, and re-attested when it must be."""

    def __init__(
        self,
        settings: NodeSettings,
        identity: AgentIdentity,
        *,
        clock: Callable[[], datetime] = _utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._identity = identity
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not secrets
        self._stranded = False

    @property
    def identity(self) -> AgentIdentity:
        return self._identity

    @property
    def stranded(self) -> bool:
        """The agent SVID expired and the agent cannot attest again by itself (a new token is needed)."""
        return self._stranded

    def save_bundle(self, bundle: SpiffeBundle) -> bool:
        """Persist a new trust bundle (from the watch); return whether it differed."""
        if bundle == self._identity.bundle:
            return False
        save_bundle(self.settings.data_dir, bundle)
        self._identity = dataclasses.replace(self._identity, bundle=bundle)
        return True

    async def maintain(self, client: AgentAPIClient) -> AgentIdentity:
        """Renew the agent SVID through ``client`` at each rotation time, forever.

        Returns only when the agent attested again (its SVID expired, or the server no longer
        accepts it, and x509pop is configured): the caller must then use a client with the new
        identity. Without x509pop, an expired agent SVID is logged as an error and this waits
        forever, leaving the cache to serve what it holds.
        """
        backoff = rotation.Backoff(rng=self._rng)
        while True:
            svid = client.identity.svid
            now = self._clock()
            if now >= svid.expires_at:
                return await self._reattest_or_strand("the agent SVID expired before it could be renewed")
            if not backoff.failing:
                await asyncio.sleep(rotation.seconds_until(rotation.renew_at(svid.leaf), now))
                if self._clock() >= svid.expires_at:
                    continue
            try:
                renewed = await client.renew(generate_key())
            except ServerAPIError as err:
                if err.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    return await self._reattest_or_strand(f"the server refused to renew the agent SVID ({err})")
                if not backoff.failing:
                    logger.warning(
                        "cannot renew the agent SVID; retrying with backoff",
                        extra={"error": str(err), "expires_at": svid.expires_at.isoformat()},
                    )
                delay = backoff.next_delay()
                await asyncio.sleep(min(delay, rotation.seconds_until(svid.expires_at, self._clock())))
                continue
            if backoff.failing:
                logger.info("the server is back: agent SVID renewed", extra={"attempts": backoff.attempts})
            backoff.reset()
            save_svid(self.settings.data_dir, renewed)
            self._identity = client.identity
            logger.info(
                "agent SVID renewed",
                extra={"spiffe_id": str(renewed.id), "expires_at": renewed.expires_at.isoformat()},
            )

    async def _reattest_or_strand(self, reason: str) -> AgentIdentity:
        if not self.settings.can_reattest:
            self._stranded = True
            logger.error(
                f"{reason}; this agent attested with a join token and cannot attest again by itself: generate a new"
                " token (spiffe-server token generate) and restart the agent with it. Workloads keep their SVIDs"
                " until they expire",
                extra={"spiffe_id": str(self._identity.svid.id)},
            )
            await _wait_forever()
        logger.warning(
            f"{reason}; attesting again ({self.settings.attestation_type})",
            extra={"spiffe_id": str(self._identity.svid.id)},
        )
        backoff = rotation.Backoff(rng=self._rng)
        while True:
            try:
                identity = await attest_node(self.settings, self._identity.roots_pem)
            except SpiffeError as err:
                delay = backoff.next_delay()
                if backoff.attempts == 1:
                    logger.warning("cannot attest again yet; retrying with backoff", extra={"error": str(err)})
                await asyncio.sleep(delay)
                continue
            save_svid(self.settings.data_dir, identity.svid)
            save_bundle(self.settings.data_dir, identity.bundle)
            self._identity = identity
            self._stranded = False
            logger.info(
                "attested again",
                extra={"spiffe_id": str(identity.svid.id), "expires_at": identity.svid.expires_at.isoformat()},
            )
            return identity


async def _wait_forever() -> NoReturn:
    """Wait until cancelled (on shutdown)."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable: nothing sets this event")
