"""``agent.yaml``: the node agent's configuration, with its defaults.

Unknown keys are errors naming the key and its line; flags of ``spiffe-agent run`` override the
file's values. Trust in the control plane comes from ``trust_bundle`` (PEM roots of the trust
domain) or, for a first contact only, ``insecure_bootstrap`` (trust on first use, loudly logged);
one of the two is required unless the data dir already holds a bundle from an earlier run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from spiffecore import SpiffeIDError, TrustDomain
from spiffeops.config import Duration

if TYPE_CHECKING:
    from sidecar.agent.attestors.k8s import K8sAttestorConfig

DEFAULT_DATA_DIR: Final = Path(".spiffe-agent")
DEFAULT_SOCKET: Final = Path("/tmp/spiffe-agent/public/api.sock")  # noqa: S108 - the documented default
DEFAULT_SERVER: Final = "127.0.0.1:8081"
DEFAULT_PSAT_TOKEN_PATH: Final = Path("/var/run/secrets/tokens/spiffe-agent")
# Istio's path for a workload identity SDS server (pilot-agent looks there; the file name is its
# WORKLOAD_IDENTITY_SOCKET_FILE, default "socket").
DEFAULT_ISTIO_SOCKET: Final = Path("/var/run/secrets/workload-spiffe-uds/socket")


@dataclass(frozen=True, slots=True, kw_only=True)
class X509PopSection:
    """The node certificate and key the agent proves possession of (both or neither)."""

    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("x509pop.cert and x509pop.key must be set together")


@dataclass(frozen=True, slots=True, kw_only=True)
class K8sPsatSection:
    """Attest with the pod's projected service account token (the agent runs as a DaemonSet pod)."""

    # The cluster's name, as the server's attestors.k8s_psat.clusters knows it.
    cluster: str
    # The projected token, read afresh at each attestation (the kubelet rotates it).
    token_path: Path = DEFAULT_PSAT_TOKEN_PATH

    def __post_init__(self) -> None:
        if not self.cluster:
            raise ValueError("k8s_psat.cluster must not be empty")


@dataclass(frozen=True, slots=True, kw_only=True)
class UnixAttestorSection:
    # Add unix:path and unix:sha256 selectors (reads and hashes the caller's binary).
    discover_workload_path: bool = False
    # Binaries larger than this are not hashed (0: no limit).
    workload_size_limit: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class K8sAttestorSection:
    """The ``k8s`` workload attestor: pods from the kubelet's read-only ``/pods`` endpoint.

    Off by default. ``node_name`` null means ``$NODE_NAME`` (set it from the downward API's
    ``spec.nodeName``), and when that is unset too the pods' node is not checked.
    """

    enabled: bool = False
    pods_url: str = "http://127.0.0.1:10255/pods"
    node_name: str | None = None
    # Where /proc/<pid>/cgroup is read (the host's /proc: the agent runs with hostPID).
    proc_root: Path = Path("/proc")
    # A container just started may not be listed yet: look this many times, poll_interval apart,
    # then attest it without k8s selectors.
    max_poll_attempts: int = 20
    poll_interval: Duration = timedelta(milliseconds=500)
    # One pod list serves every caller for this long.
    cache_ttl: Duration = timedelta(seconds=1)

    def __post_init__(self) -> None:
        # The attestor's own rules, checked here so the error names this section and its line.
        self.attestor_config()

    def attestor_config(self) -> K8sAttestorConfig:
        """The attestor's settings (``node_name`` as written; the agent falls back to ``$NODE_NAME``)."""
        # Imported late: the workload commands read this module and need no attestor.
        from sidecar.agent.attestors.k8s import K8sAttestorConfig  # noqa: PLC0415

        return K8sAttestorConfig(
            pods_url=self.pods_url,
            node_name=self.node_name,
            proc_root=self.proc_root,
            max_poll_attempts=self.max_poll_attempts,
            poll_interval=self.poll_interval.total_seconds(),
            cache_ttl=self.cache_ttl.total_seconds(),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadAttestorsSection:
    unix: UnixAttestorSection = field(default_factory=UnixAttestorSection)
    k8s: K8sAttestorSection = field(default_factory=K8sAttestorSection)


@dataclass(frozen=True, slots=True, kw_only=True)
class SDSSection:
    """Envoy SDS on the agent's socket: the resource names (``null`` disables one) and the bundles' form.

    The defaults are SPIRE's and Istio's names. Istio with federation wants ``ROOTCA`` to mean every
    bundle: ``root_ca_name: null`` and ``all_bundles_name: ROOTCA``.
    """

    default_svid_name: str | None = "default"
    root_ca_name: str | None = "ROOTCA"
    all_bundles_name: str | None = "ALL"
    # Bundles as a plain trusted_ca of one trust domain instead of Envoy's SPIFFE certificate
    # validator (then all_bundles_name cannot be served). SPIRE's key of the same name.
    disable_spiffe_cert_validation: bool = False

    def __post_init__(self) -> None:
        # The SDS server's own rules for names, checked here so the error names this section and its
        # line. Imported late: the workload commands read this module and need no Envoy protos.
        from sidecar.sds.resources import SDSConfig  # noqa: PLC0415

        SDSConfig(
            default_svid_name=self.default_svid_name,
            root_ca_name=self.root_ca_name,
            all_bundles_name=self.all_bundles_name,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class IstioSection:
    """A second public socket for Istio's proxies, with Istio's SDS names (:mod:`sidecar.agent.istio`).

    ``default`` is the caller's SVID and ``ROOTCA`` every bundle it may see, federated ones
    included, as Envoy's SPIFFE certificate validator; the main socket keeps the ``sds:`` names.
    """

    enabled: bool = False
    socket: Path = DEFAULT_ISTIO_SOCKET


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    trust_domain: str
    server: str = DEFAULT_SERVER
    trust_bundle: Path | None = None
    insecure_bootstrap: bool = False
    join_token: str | None = None
    x509pop: X509PopSection = field(default_factory=X509PopSection)
    k8s_psat: K8sPsatSection | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    socket: Path = DEFAULT_SOCKET
    # HOST:PORT for /healthz, /readyz and /metrics; off when unset.
    status: str | None = None
    log_format: Literal["text", "json"] = "text"
    log_level: str = "info"
    workload_attestors: WorkloadAttestorsSection = field(default_factory=WorkloadAttestorsSection)
    sds: SDSSection = field(default_factory=SDSSection)
    istio: IstioSection = field(default_factory=IstioSection)

    def __post_init__(self) -> None:
        try:
            TrustDomain.parse(self.trust_domain)
        except SpiffeIDError as err:
            raise ValueError(f"trust_domain is not valid: {err}") from err
        if self.trust_bundle is not None and self.insecure_bootstrap:
            raise ValueError("trust_bundle and insecure_bootstrap exclude each other: choose one")
        if self.join_token is not None and self.x509pop.cert is not None:
            raise ValueError("join_token and x509pop exclude each other: choose one node attestor")
        if self.k8s_psat is not None and (self.join_token is not None or self.x509pop.cert is not None):
            raise ValueError("k8s_psat excludes join_token and x509pop: choose one node attestor")
        if self.istio.enabled and self.istio.socket == self.socket:
            raise ValueError(f"istio.socket must differ from socket: both are {str(self.socket)!r}")

    @property
    def trust_domain_value(self) -> TrustDomain:
        return TrustDomain.parse(self.trust_domain)
