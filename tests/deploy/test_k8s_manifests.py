"""The Kubernetes manifests in ``deploy/k8s/``: valid objects, complete kustomizations, and commands,
configs, paths and probes that fit the programs they run.

Offline, with no cluster: every object is validated against the Kubernetes API schemas (strictly,
unknown fields are errors) of the oldest supported version and the newest known one. Each
kustomization is built by a small stand-in for kustomize that handles only what these files use
(``resources``; anything else fails the test rather than being ignored), and within each build
every reference must resolve: service accounts, ConfigMaps, Service selectors and target ports.
Every container's command is parsed by our own command line parsers, its ``--config`` file is
taken from the ConfigMap mounted there and loaded by the real config loader, every socket a
workload names must be the agent's socket on the node, and every probe must point at the address
the program serves its status on. Envoy's configs must be what ``deploy/envoy/render.py`` makes
of the command written above them, and pass ``envoy --mode validate``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any, Final

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from controlplane import cli as server_cli
from controlplane.config import ServerConfig
from sidecar import cli as agent_cli
from sidecar.agent.config import AgentConfig
from sidecar.helper.config import HelperConfig
from sidecar.proxy import cli as proxy_cli
from sidecar.proxy.app import ProxyConfig
from spiffeops.config import load_config
from spiffeops.status import parse_host_port
from tests.deploy.support import ENVOY_DIR, ROOT, load_renderer
from tests.support.envoy import envoy_binary

render = load_renderer()

K8S_DIR: Final = ROOT / "deploy" / "k8s"
DOCS: Final = (ROOT / "docs" / "kubernetes.md", ROOT / "docs" / "istio.md")
ENTRY_POINTS: Final = (K8S_DIR, K8S_DIR / "postgres", K8S_DIR / "examples")
# 1.30: the first whose projected tokens name the node (k8s_psat needs it); native sidecars are older.
KUBERNETES_VERSIONS: Final = ("1.30.0", kubernetes_validate.latest_version())
IMAGE: Final = f"ghcr.io/spiffe-sidecar/spiffe-sidecar:{version('spiffe-sidecar')}"
ENVOY_IMAGE: Final = re.compile(r"envoyproxy/envoy:v(?P<version>\d+\.\d+\.\d+)")
WORKLOAD_KINDS: Final = frozenset({"Deployment", "StatefulSet", "DaemonSet"})
# Objects the manifests use that are made by hand, each by a command in docs/kubernetes.md.
MADE_BY_HAND: Final[Mapping[tuple[str, str, str], str]] = {
    ("ConfigMap", "spiffe-system", "spiffe-bundle"): "the server's trust bundle, for the agents' first contact",
    ("Secret", "spiffe-system", "spiffe-upstream-ca"): "postgres/: the upstream CA's certificate and key",
    ("Secret", "spiffe-system", "spiffe-postgres"): "postgres/: the database password",
}
SOCKET_FLAGS: Final = ("--workload-api", "--socket")
RENDERED: Final = re.compile(r"^# rendered: python deploy/envoy/render\.py (?P<args>.+)$", re.MULTILINE)

Object = dict[str, Any]


# --- reading the manifests ------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """One YAML document of a manifest file, with its source text."""

    path: Path
    text: str
    document: Object

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(K8S_DIR)}: {self.document['kind']} {self.document['metadata']['name']}"


def manifest_files() -> list[Path]:
    return sorted(path for path in K8S_DIR.rglob("*.yaml") if path.name != "kustomization.yaml")


def read_manifests(path: Path) -> list[Manifest]:
    chunks = re.split(r"^---\s*$", path.read_text(), flags=re.MULTILINE)
    manifests = []
    for chunk in chunks:
        document = yaml.safe_load(chunk)
        if document is not None:
            manifests.append(Manifest(path=path, text=chunk, document=document))
    return manifests


def all_manifests() -> list[Manifest]:
    return [manifest for path in manifest_files() for manifest in read_manifests(path)]


def kustomization(directory: Path) -> Object:
    document: Object = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return document


def build(directory: Path) -> list[Manifest]:
    """What ``kubectl kustomize directory`` gives for these files: their resources, recursively."""
    document = kustomization(directory)
    handled = {"apiVersion", "kind", "resources"}
    assert set(document) <= handled, (
        f"{directory}/kustomization.yaml uses {sorted(set(document) - handled)}: teach this test's build() about it"
    )
    assert (document["apiVersion"], document["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    objects: list[Manifest] = []
    for entry in document["resources"]:
        target = (directory / entry).resolve()
        objects += build(target) if target.is_dir() else read_manifests(target)
    return objects


def key(document: Object) -> tuple[str, str, str]:
    return (document["kind"], document["metadata"].get("namespace", ""), document["metadata"]["name"])


@dataclass(frozen=True)
class Container:
    """A container of a workload, with the objects of the build it belongs to."""

    workload: Manifest
    spec: Object
    objects: Mapping[tuple[str, str, str], Object]

    @property
    def name(self) -> str:
        return f"{self.workload.name} container {self.spec['name']}"

    @property
    def namespace(self) -> str:
        namespace: str = self.workload.document["metadata"]["namespace"]
        return namespace

    @property
    def pod(self) -> Object:
        pod: Object = self.workload.document["spec"]["template"]["spec"]
        return pod

    @property
    def argv(self) -> list[str]:
        return [*self.spec.get("command", []), *self.spec.get("args", [])]

    @property
    def env(self) -> dict[str, str]:
        return {item["name"]: item["value"] for item in self.spec.get("env", []) if "value" in item}

    def mount(self, path: str) -> tuple[Object, PurePosixPath]:
        """The volume ``path`` lies in, and the path relative to the mount (the longest mount wins)."""
        target = PurePosixPath(path)
        mounts = [m for m in self.spec.get("volumeMounts", []) if target.is_relative_to(m["mountPath"])]
        assert mounts, f"{self.name}: {path} is on no volume"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        claims = [
            {"name": claim["metadata"]["name"], "persistentVolumeClaim": claim["spec"]}
            for claim in self.workload.document["spec"].get("volumeClaimTemplates", [])
        ]
        volume = next(v for v in [*self.pod.get("volumes", []), *claims] if v["name"] == mount["name"])
        return volume, target.relative_to(mount["mountPath"])

    def file(self, path: str) -> str:
        """The content of ``path``, which must come from a ConfigMap of the build."""
        volume, relative = self.mount(path)
        assert "configMap" in volume, f"{self.name}: {path} is not from a ConfigMap"
        config_map = self.objects[("ConfigMap", self.namespace, volume["configMap"]["name"])]
        content: str = config_map["data"][str(relative)]
        return content

    def host_path(self, path: str) -> PurePosixPath:
        """Where ``path`` is on the node (it must be on a hostPath volume)."""
        volume, relative = self.mount(path)
        assert "hostPath" in volume, f"{self.name}: {path} is not on a hostPath volume"
        return PurePosixPath(volume["hostPath"]["path"]) / relative


def containers(objects: Sequence[Manifest]) -> list[Container]:
    index = {key(m.document): m.document for m in objects}
    found = []
    for manifest in objects:
        if manifest.document["kind"] in WORKLOAD_KINDS:
            pod = manifest.document["spec"]["template"]["spec"]
            for spec in [*pod.get("initContainers", []), *pod["containers"]]:
                found.append(Container(workload=manifest, spec=spec, objects=index))
    return found


def all_containers() -> list[Container]:
    seen: dict[str, Container] = {}
    for entry in ENTRY_POINTS:
        for container in containers(build(entry)):
            seen.setdefault(container.name, container)
    return list(seen.values())


def parse(parser: argparse.ArgumentParser, argv: Sequence[str], where: str) -> argparse.Namespace:
    try:
        return parser.parse_args(list(argv))
    except SystemExit as err:  # argparse's way of refusing: its message went to stderr
        raise AssertionError(f"{where}: {shlex.join(argv)} is refused by {parser.prog}'s parser") from err


def with_config(args: argparse.Namespace, container: Container, tmp_path: Path) -> argparse.Namespace:
    """``args`` with ``--config`` pointing at a copy of the ConfigMap file mounted at that path."""
    assert args.config is not None, f"{container.name}: no --config"
    copy = tmp_path / f"{container.spec['name']}-{Path(str(args.config)).name}"
    copy.write_text(container.file(str(args.config)))
    args.config = copy
    return args


@dataclass(frozen=True)
class Loaded:
    """What a container runs, loaded by our own code."""

    program: str
    config: AgentConfig | ServerConfig | HelperConfig | ProxyConfig | None
    status: str | None  # HOST:PORT of /healthz and /readyz
    sockets: tuple[str, ...]  # Workload API or SDS sockets it calls (paths in its container)


def load(container: Container, tmp_path: Path) -> Loaded:
    """Parse and load the container's command with the project's own parsers and config loaders."""
    argv = container.argv
    where = container.name
    match argv:
        case ["spiffe-server", *rest]:
            args = parse(server_cli.build_parser(), rest, where)
            assert args.command == "run", f"{where}: runs spiffe-server {args.command}"
            server = server_cli.load_server_config(with_config(args, container, tmp_path))
            return Loaded("spiffe-server", server, server.status, ())
        case ["spiffe-agent", "run", *_]:
            args = parse(agent_cli.build_parser(), argv[1:], where)
            agent = agent_cli.load_agent_config(with_config(args, container, tmp_path))
            return Loaded("spiffe-agent", agent, agent.status, ())
        case ["spiffe-agent", "helper", *_]:
            args = parse(agent_cli.build_parser(), argv[1:], where)
            helper = agent_cli.load_helper_config(args)
            return Loaded("spiffe-agent helper", helper, helper.health, (helper.socket or "",))
        case ["spiffe-proxy", *rest]:
            args = parse(proxy_cli.build_parser(), rest, where)
            proxy = proxy_cli.load_config(args, container.env)
            status = None if proxy.status is None else f"{proxy.status[0]}:{proxy.status[1]}"
            return Loaded("spiffe-proxy", proxy, status, (proxy.workload_api or "",))
        case ["python", script, *_]:
            source = container.file(script)
            compile(source, script, "exec")
            return Loaded("python", None, None, ())
        case ["envoy", "-c", config_path, *_]:
            bootstrap = yaml.safe_load(container.file(config_path))
            pipes = [
                endpoint["endpoint"]["address"]["pipe"]["path"]
                for cluster in bootstrap["static_resources"]["clusters"]
                for group in cluster["load_assignment"]["endpoints"]
                for endpoint in group["lb_endpoints"]
                if "pipe" in endpoint["endpoint"]["address"]
            ]
            return Loaded("envoy", None, None, tuple(pipes))
    raise AssertionError(f"{where}: runs {argv!r}, which this test does not know")


def socket_path(address: str) -> str:
    """A Workload API address as a path: unix:///path, unix:/path or a path."""
    return address.removeprefix("unix://").removeprefix("unix:")


# --- the objects ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(kubernetes_version: str) -> None:
    manifests = all_manifests()
    assert len(manifests) >= 25
    failures = []
    for manifest in manifests:
        try:
            kubernetes_validate.validate(manifest.document, kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            failures.append(f"{manifest.name}: {'.'.join(map(str, err.path))}: {err.message}")
    assert not failures, "\n".join(failures)


def test_each_kustomization_lists_every_file_beside_it() -> None:
    directories = {path.parent for path in K8S_DIR.rglob("*.yaml")}
    assert {K8S_DIR, *(K8S_DIR / d for d in ("base", "sqlite", "postgres", "examples"))} <= directories
    for directory in sorted(directories):
        assert (directory / "kustomization.yaml").is_file(), f"{directory} has manifests but no kustomization.yaml"
        resources = kustomization(directory)["resources"]
        assert len(resources) == len(set(resources)), f"{directory}: a resource is listed twice"
        files = {entry for entry in resources if not (directory / entry).is_dir()}
        beside = {path.name for path in directory.glob("*.yaml") if path.name != "kustomization.yaml"}
        assert files == beside, f"{directory}: listed {sorted(files)}, present {sorted(beside)}"
        for entry in resources:
            target = directory / entry
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{directory}: {entry} is missing"


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_build_is_complete_and_consistent(entry: Path) -> None:
    objects = build(entry)
    keys = [key(m.document) for m in objects]
    assert len(keys) == len(set(keys)), f"objects defined twice: {sorted(k for k in keys if keys.count(k) > 1)}"
    index = {key(m.document): m.document for m in objects}
    namespaces = {name for kind, _, name in index if kind == "Namespace"}
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}

    def exists(kind: str, namespace: str, name: str) -> bool:
        return (kind, namespace, name) in index or (kind, namespace, name) in MADE_BY_HAND

    for manifest in objects:
        document = manifest.document
        kind, namespace, _ = key(document)
        assert (kind in cluster_scoped) == (namespace == ""), f"{manifest.name}: namespace {namespace!r}"
        if namespace:
            assert namespace in namespaces, f"{manifest.name}: its namespace is not in the build"
        if kind == "ClusterRoleBinding":
            assert exists("ClusterRole", "", document["roleRef"]["name"])
            for subject in document["subjects"]:
                assert exists(subject["kind"], subject["namespace"], subject["name"]), manifest.name
        if kind in WORKLOAD_KINDS:
            template = document["spec"]["template"]
            assert document["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
            pod = template["spec"]
            assert exists("ServiceAccount", namespace, pod["serviceAccountName"]), f"{manifest.name}: no account"
            for volume in pod.get("volumes", []):
                if "configMap" in volume:
                    assert exists("ConfigMap", namespace, volume["configMap"]["name"]), f"{manifest.name}: {volume}"
                if "secret" in volume:
                    assert exists("Secret", namespace, volume["secret"]["secretName"]), f"{manifest.name}: {volume}"
            for container in [*pod.get("initContainers", []), *pod["containers"]]:
                assert container["image"] == IMAGE or ENVOY_IMAGE.fullmatch(container["image"]), container["image"]
                for variable in container.get("env", []):
                    reference = variable.get("valueFrom", {}).get("secretKeyRef")
                    if reference is not None:
                        assert exists("Secret", namespace, reference["name"]), f"{manifest.name}: {variable}"
                mounts = {mount["name"] for mount in container.get("volumeMounts", [])}
                volumes = {volume["name"] for volume in pod.get("volumes", [])}
                claims = {claim["metadata"]["name"] for claim in document["spec"].get("volumeClaimTemplates", [])}
                assert mounts <= volumes | claims, f"{manifest.name}: mounts {sorted(mounts - volumes - claims)}"
        if kind == "Service":
            selector = document["spec"]["selector"]
            pods = [
                m.document["spec"]["template"]
                for m in objects
                if m.document["kind"] in WORKLOAD_KINDS
                and m.document["metadata"]["namespace"] == namespace
                and selector.items() <= m.document["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert pods, f"{manifest.name}: selects no pod of the build"
            for port in document["spec"]["ports"]:
                target = port["targetPort"]
                offered = {
                    (p.get("name"), p["containerPort"])
                    for template in pods
                    for c in template["spec"]["containers"]
                    for p in c.get("ports", [])
                }
                assert any(target in pair for pair in offered), f"{manifest.name}: no container port {target}"


def test_images_are_this_version_and_the_tested_envoy() -> None:
    output = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, check=True).stdout  # noqa: S603
    tested = re.search(r"/(\d+\.\d+\.\d+)/", output)
    assert tested is not None, output
    images = {container.spec["image"] for container in all_containers()}
    assert images == {IMAGE, f"envoyproxy/envoy:v{tested[1]}"}


# --- what runs in the containers ------------------------------------------------------------------------------


def test_every_command_and_flag_exists_and_every_config_loads(tmp_path: Path) -> None:
    programs = [load(container, tmp_path).program for container in all_containers()]
    # The server (twice: SQLite and PostgreSQL), the agent, both proxy modes, the helper, Envoys, apps.
    assert sorted(set(programs)) == [
        "envoy",
        "python",
        "spiffe-agent",
        "spiffe-agent helper",
        "spiffe-proxy",
        "spiffe-server",
    ]
    assert programs.count("spiffe-server") == 2


@pytest.mark.parametrize(
    ("manifest", "loader"),
    [
        ("sqlite/server-config.yaml", ServerConfig),
        ("postgres/server-config.yaml", ServerConfig),
        ("base/agent-config.yaml", AgentConfig),
    ],
)
def test_embedded_config_files_load(manifest: str, loader: type[Any], tmp_path: Path) -> None:
    """Each ConfigMap's file through the project's config loader (unknown keys are errors there)."""
    (document,) = [m.document for m in read_manifests(K8S_DIR / manifest)]
    ((name, content),) = document["data"].items()
    path = tmp_path / name
    path.write_text(content)
    loaded = load_config(path, loader)
    assert loaded.trust_domain == "example.org"


def test_probes_point_at_the_status_addresses(tmp_path: Path) -> None:
    checked = 0
    for container in all_containers():
        loaded = load(container, tmp_path)
        probes = {
            kind: container.spec[kind]
            for kind in ("livenessProbe", "readinessProbe", "startupProbe")
            if kind in container.spec
        }
        http = {kind: probe["httpGet"] for kind, probe in probes.items() if "httpGet" in probe}
        if loaded.program == "envoy":
            bootstrap = yaml.safe_load(container.file(container.argv[2]))
            ports = {
                listener["address"]["socket_address"]["port_value"]
                for listener in bootstrap["static_resources"]["listeners"]
            }
            assert probes, f"{container.name}: no probe"
            for kind, probe in probes.items():
                assert probe["tcpSocket"]["port"] in ports, f"{container.name}: {kind} is on no listener"
            checked += 1
            continue
        if loaded.status is None:
            assert not probes, f"{container.name} has probes but serves no status"
            continue
        host, port = parse_host_port(loaded.status)
        assert {"livenessProbe", "readinessProbe"} <= http.keys(), f"{container.name}: liveness and readiness"
        for kind, probe in http.items():
            assert probe["path"] == ("/healthz" if kind == "livenessProbe" else "/readyz"), f"{container.name}: {kind}"
            assert probe["port"] == port, f"{container.name}: {kind} on {probe['port']}, status on {port}"
            # The kubelet probes the pod's IP unless told a host: a loopback status needs host 127.0.0.1,
            # which reaches it only from the node's own network (hostNetwork).
            if host in {"127.0.0.1", "localhost"}:
                assert probe.get("host") == "127.0.0.1", f"{container.name}: {kind}"
                assert container.pod.get("hostNetwork"), f"{container.name}: {kind}"
            else:
                assert host == "0.0.0.0", f"{container.name}: {kind}"  # noqa: S104
                assert "host" not in probe, f"{container.name}: {kind}"
        checked += 1
    assert checked >= 8


def test_workloads_call_the_agents_socket_on_the_node(tmp_path: Path) -> None:
    (agent,) = [c for c in containers(build(K8S_DIR)) if c.argv[:2] == ["spiffe-agent", "run"]]
    config = load(agent, tmp_path).config
    assert isinstance(config, AgentConfig)
    agent_socket = agent.host_path(str(config.socket))
    assert agent_socket == PurePosixPath("/run/spiffe/agent/api.sock")
    assert config.istio.enabled
    assert agent.host_path(str(config.istio.socket)) == PurePosixPath("/run/spiffe/istio/socket")
    assert str(config.istio.socket) == "/var/run/secrets/workload-spiffe-uds/socket"  # Istio's path in the agent too
    callers = 0
    for container in all_containers():
        for address in load(container, tmp_path).sockets:
            assert address, f"{container.name}: no Workload API address"
            assert container.host_path(socket_path(address)) == agent_socket, f"{container.name}: {address}"
            callers += 1
    assert callers == 5  # two Envoys, two spiffe-proxies, one helper


def test_agent_and_server_agree_on_attestation(tmp_path: Path) -> None:
    objects = build(K8S_DIR)
    (agent,) = [c for c in containers(objects) if c.argv[:2] == ["spiffe-agent", "run"]]
    (server,) = [c for c in containers(objects) if c.argv[0] == "spiffe-server"]
    agent_config = load(agent, tmp_path).config
    server_config = load(server, tmp_path).config
    assert isinstance(agent_config, AgentConfig)
    assert isinstance(server_config, ServerConfig)
    pod = agent.pod
    assert pod["hostPID"] is True, "workload attestation reads the callers' /proc entries"
    env = {item["name"]: item for item in agent.spec["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}

    psat = agent_config.k8s_psat
    assert psat is not None
    cluster = server_config.attestors.k8s_psat.clusters[psat.cluster]
    assert f"{agent.namespace}:{pod['serviceAccountName']}" in cluster.service_account_allow_list
    volume, relative = agent.mount(str(psat.token_path))
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["path"] == str(relative)
    assert token["audience"] in cluster.audience
    assert token["expirationSeconds"] <= 3600
    assert agent_config.workload_attestors.k8s.enabled
    assert agent_config.workload_attestors.k8s.pods_url.startswith("http://127.0.0.1:")
    assert pod["hostNetwork"] is True, "the kubelet's read-only port is on the node's loopback"

    # The server reads the issuer keys with its own service account token and the cluster's CA.
    assert cluster.jwks_url == "https://kubernetes.default.svc/openid/v1/jwks"
    assert server.pod.get("automountServiceAccountToken", True)
    for path in (cluster.jwks_ca_file, cluster.jwks_token_file):
        assert path is not None
        assert path.parent == Path("/var/run/secrets/kubernetes.io/serviceaccount")
    (role,) = [m.document for m in objects if m.document["kind"] == "ClusterRole"]
    assert {"/openid/v1/jwks"} <= set(role["rules"][0]["nonResourceURLs"])
    assert role["rules"][0]["verbs"] == ["get"]

    # The agent reaches the server's agent API Service; the federation endpoint has a Service too.
    services = {m.document["metadata"]["name"]: m.document for m in objects if m.document["kind"] == "Service"}
    host, _, port = agent_config.server.rpartition(":")
    assert host == f"spiffe-server.{server.namespace}.svc"
    assert int(port) in {p["port"] for p in services["spiffe-server"]["spec"]["ports"]}
    assert int(port) == parse_host_port(server_config.bind)[1]
    endpoint = server_config.federation.bundle_endpoint
    assert endpoint is not None
    assert endpoint.profile == "https_spiffe"
    assert parse_host_port(endpoint.address)[1] in {
        p["port"] for p in services["spiffe-server-federation"]["spec"]["ports"]
    }


def test_server_paths_are_on_their_volumes(tmp_path: Path) -> None:
    for entry in (K8S_DIR, K8S_DIR / "postgres"):
        (server,) = [c for c in containers(build(entry)) if c.argv[0] == "spiffe-server"]
        config = load(server, tmp_path).config
        assert isinstance(config, ServerConfig)
        data, _ = server.mount(str(config.data_dir))
        assert data["name"] == "data"
        assert config.admin_socket_path.is_relative_to(config.data_dir)
        if config.database_url is None:  # SQLite: the store must outlive the pod
            claims = server.workload.document["spec"]["volumeClaimTemplates"]
            assert [claim["metadata"]["name"] for claim in claims] == ["data"]
        else:
            assert config.ca.upstream_cert is not None
            assert config.ca.upstream_key is not None
            for path in (config.ca.upstream_cert, config.ca.upstream_key):
                volume, relative = server.mount(str(path))
                assert volume["secret"]["secretName"] == "spiffe-upstream-ca"
                assert str(relative) in {"tls.crt", "tls.key"}
            assert ":" not in config.database_url.split("@")[0].removeprefix("postgresql+psycopg://"), "no password"


def test_envoy_configs_are_the_rendered_templates_and_valid(tmp_path: Path) -> None:
    manifests = read_manifests(K8S_DIR / "examples" / "envoy-sidecar.yaml")
    rendered = [(m, RENDERED.search(m.text)) for m in manifests if m.document["kind"] == "ConfigMap"]
    assert len(rendered) == 2
    for manifest, command in rendered:
        assert command is not None, f"{manifest.name}: no '# rendered: python deploy/envoy/render.py ...' line"
        template, *assignments = shlex.split(command["args"])
        values = render.parse_assignments(assignments)
        expected = render.render((ENVOY_DIR / template).read_text(), values)
        assert manifest.document["data"]["envoy.yaml"] == expected, f"{manifest.name}: not what the command renders"
        config = tmp_path / f"{manifest.document['metadata']['name']}.yaml"
        config.write_text(expected)
        result = subprocess.run(  # noqa: S603 - the real Envoy on our own file
            [envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{manifest.name}: {result.stdout}{result.stderr}"


# --- the documents ------------------------------------------------------------------------------------------


def doc_commands(path: Path) -> Iterator[tuple[str, list[str]]]:
    """Each ``spiffe-server``, ``spiffe-agent`` or ``spiffe-proxy`` command in the shell blocks of ``path``.

    Continued lines are joined; a command ends at a shell operator. ``spiffe_server`` (the docs'
    shell function for ``kubectl exec ... spiffe-server``) counts as ``spiffe-server``.
    """
    text = path.read_text()
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)
            for start, token in enumerate(tokens):
                program = {"spiffe_server": "spiffe-server"}.get(token, token)
                if program in {"spiffe-server", "spiffe-agent", "spiffe-proxy"}:
                    rest = []
                    for word in tokens[start + 1 :]:
                        if word and all(char in "();<>|&" for char in word):
                            break
                        rest.append(word)
                    if rest and rest[0] != "$@":
                        yield program, rest


def test_commands_in_the_docs_exist() -> None:
    parsers = {
        "spiffe-server": server_cli.build_parser,
        "spiffe-agent": agent_cli.build_parser,
        "spiffe-proxy": proxy_cli.build_parser,
    }
    count = 0
    for path in DOCS:
        for program, argv in doc_commands(path):
            parse(parsers[program](), argv, f"{path.name}: {program}")
            count += 1
    assert count >= 15


def test_docs_make_what_the_manifests_expect() -> None:
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    for (kind, namespace, name), what in MADE_BY_HAND.items():
        assert re.search(rf"kubectl -n {namespace} create {kind.lower()}\b[^\n]*\b{name}\b", text), (
            f"docs/kubernetes.md does not make the {kind} {name} ({what})"
        )
    istio = (ROOT / "docs" / "istio.md").read_text()
    assert "path: /run/spiffe/istio" in istio, "the Istio injection template must mount the agent's host directory"
