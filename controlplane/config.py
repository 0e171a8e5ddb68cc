"""``server.yaml``: the control plane's configuration, with its defaults.

Every key is optional but ``trust_domain``; unknown keys are errors naming the key and its line.
Command-line flags of ``spiffe-server run`` override the file's values. A TTL that the CA could
not honour in full (an SVID TTL above a sixth of the CA TTL) is an error here, at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Final, Literal

from controlplane.attest.jwks import check_jwks_url
from controlplane.attest.k8s_psat import DEFAULT_AUDIENCE as DEFAULT_PSAT_AUDIENCE
from controlplane.attest.k8s_psat import check_cluster_name, parse_service_account
from controlplane.ca.config import CAConfig
from controlplane.ca.keys import KeyType
from spiffecore import SpiffeIDError, TrustDomain
from spiffeops.config import Duration
from spiffeops.status import AddressError, parse_host_port

DEFAULT_DATA_DIR: Final = Path(".spiffe-server")
DEFAULT_BIND: Final = "127.0.0.1:8081"


@dataclass(frozen=True, slots=True, kw_only=True)
class CASection:
    key_type: Literal["ec-p256", "ec-p384", "rsa-2048"] = "ec-p256"
    jwt_key_type: Literal["ec-p256", "ec-p384", "rsa-2048"] = "ec-p256"
    ttl: Duration = timedelta(hours=24)
    upstream_cert: Path | None = None
    upstream_key: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SVIDSection:
    x509_ttl: Duration = timedelta(hours=1)
    jwt_ttl: Duration = timedelta(minutes=5)
    agent_ttl: Duration = timedelta(hours=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinTokenSection:
    enabled: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class X509PopSection:
    # PEM file of the CA certificates node certificates must chain to; x509pop is off without it.
    ca_bundle: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class K8sPsatClusterSection:
    """One Kubernetes cluster whose agents attest with projected service account tokens."""

    # NAMESPACE:SERVICE_ACCOUNT of the agents' pods; no other token is accepted.
    service_account_allow_list: tuple[str, ...]
    # The token must carry one of these audiences (the agent's projected token requests one).
    audience: tuple[str, ...] = (DEFAULT_PSAT_AUDIENCE,)
    # The cluster's service account issuer keys (JWK Set): a file, or an https URL (exactly one).
    jwks_file: Path | None = None
    jwks_url: str | None = None
    # For jwks_url: PEM roots for its certificate (default: the system's), and a file whose bearer
    # token is sent with each fetch (the API server's /openid/v1/jwks wants one).
    jwks_ca_file: Path | None = None
    jwks_token_file: Path | None = None
    # The token's iss must equal this, when set.
    issuer: str | None = None

    def __post_init__(self) -> None:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of jwks_file and jwks_url")
        if self.jwks_url is not None:
            check_jwks_url(self.jwks_url)
        elif self.jwks_ca_file is not None or self.jwks_token_file is not None:
            raise ValueError("jwks_ca_file and jwks_token_file go with jwks_url")
        if not self.service_account_allow_list:
            raise ValueError("service_account_allow_list must name at least one NAMESPACE:SERVICE_ACCOUNT")
        for entry in self.service_account_allow_list:
            parse_service_account(entry)
        if not self.audience or not all(self.audience):
            raise ValueError("audience must hold at least one non-empty audience")
        if self.issuer is not None and not self.issuer:
            raise ValueError("issuer must not be empty (leave it out to accept any)")


@dataclass(frozen=True, slots=True, kw_only=True)
class K8sPsatSection:
    # Cluster name (a segment of agent IDs) -> its settings; k8s_psat is off without clusters.
    clusters: dict[str, K8sPsatClusterSection] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.clusters:
            check_cluster_name(name)


@dataclass(frozen=True, slots=True, kw_only=True)
class AttestorsSection:
    join_token: JoinTokenSection = field(default_factory=JoinTokenSection)
    x509pop: X509PopSection = field(default_factory=X509PopSection)
    k8s_psat: K8sPsatSection = field(default_factory=K8sPsatSection)


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleEndpointSection:
    """This trust domain's SPIFFE bundle endpoint (off unless ``federation.bundle_endpoint`` is set)."""

    # HOST:PORT to serve GET / on (port 0: any free port).
    address: str
    # https_spiffe: TLS with the server's own SVID (spiffe://<td>/spire/server), the ID the other
    # side pins. https_web: TLS with cert and key (PEM files, re-read when they change).
    profile: Literal["https_spiffe", "https_web"] = "https_spiffe"
    cert: Path | None = None
    key: Path | None = None
    # spiffe_refresh_hint of the served bundle: how often other trust domains should fetch it.
    refresh_hint: Duration = timedelta(minutes=5)

    def __post_init__(self) -> None:
        try:
            parse_host_port(self.address)
        except AddressError as err:
            raise ValueError(f"address must be HOST:PORT, [IPV6]:PORT or :PORT: {self.address!r}") from err
        if self.profile == "https_web" and (self.cert is None or self.key is None):
            raise ValueError("the https_web profile needs cert and key")
        if self.profile == "https_spiffe" and (self.cert is not None or self.key is not None):
            raise ValueError("cert and key are for the https_web profile (https_spiffe serves the server's SVID)")
        if not timedelta(seconds=1) <= self.refresh_hint <= timedelta(seconds=2**31 - 1):
            raise ValueError("refresh_hint must be at least 1s")
        if self.refresh_hint.microseconds:
            raise ValueError("refresh_hint must be whole seconds")


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationSection:
    bundle_endpoint: BundleEndpointSection | None = None
    # Bounds of how often a federated bundle is fetched (its refresh hint, or 5m without one).
    min_refresh_interval: Duration = timedelta(minutes=1)
    max_refresh_interval: Duration = timedelta(hours=1)
    # One fetch, connection included, must finish within this.
    fetch_timeout: Duration = timedelta(seconds=10)
    # PEM CA certificates trusted for https_web bundle endpoints besides the system's roots.
    web_roots: Path | None = None

    def __post_init__(self) -> None:
        if self.min_refresh_interval < timedelta(seconds=1):
            raise ValueError("min_refresh_interval must be at least 1s")
        if self.min_refresh_interval > self.max_refresh_interval:
            raise ValueError("min_refresh_interval must not exceed max_refresh_interval")
        if not timedelta(seconds=1) <= self.fetch_timeout <= timedelta(minutes=5):
            raise ValueError("fetch_timeout must be from 1s to 5m")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    trust_domain: str
    data_dir: Path = DEFAULT_DATA_DIR
    bind: str = DEFAULT_BIND
    # Default: <data_dir>/admin/admin.sock (the directory is made 0700).
    admin_socket: Path | None = None
    # Default: SQLite in the data dir. PostgreSQL: postgresql+psycopg://user@host:5432/db
    database_url: str | None = None
    # HOST:PORT for /healthz, /readyz and /metrics; off when unset.
    status: str | None = None
    log_format: Literal["text", "json"] = "text"
    log_level: str = "info"
    # How often to re-read entry changes when no notification arrives (PostgreSQL sends them).
    recheck_interval: Duration = timedelta(seconds=1)
    ca: CASection = field(default_factory=CASection)
    svid: SVIDSection = field(default_factory=SVIDSection)
    attestors: AttestorsSection = field(default_factory=AttestorsSection)
    federation: FederationSection = field(default_factory=FederationSection)

    def __post_init__(self) -> None:
        try:
            TrustDomain.parse(self.trust_domain)
        except SpiffeIDError as err:
            raise ValueError(f"trust_domain is not valid: {err}") from err
        self.ca_config()  # the TTL checks, at start-up

    @property
    def trust_domain_value(self) -> TrustDomain:
        return TrustDomain.parse(self.trust_domain)

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.data_dir / "admin" / "admin.sock"

    def ca_config(self) -> CAConfig:
        return CAConfig(
            trust_domain=self.trust_domain_value,
            key_type=KeyType.parse(self.ca.key_type),
            jwt_key_type=KeyType.parse(self.ca.jwt_key_type),
            ca_ttl=self.ca.ttl,
            x509_svid_ttl=self.svid.x509_ttl,
            jwt_svid_ttl=self.svid.jwt_ttl,
            agent_svid_ttl=self.svid.agent_ttl,
            upstream_cert_path=self.ca.upstream_cert,
            upstream_key_path=self.ca.upstream_key,
        )
