"""The Envoy bootstraps in ``deploy/envoy/``: rendered with sample values, checked by the real Envoy.

Every template is rendered and run through ``envoy --mode validate`` (which needs no SDS server:
it builds the whole configuration but opens no connection). Validation does not build TLS
contexts that wait for SDS, so the security-relevant fields (TLS versions and ciphers, the client
certificate requirement, the SAN matchers, the SDS names and cluster, loopback-only admin) are
checked here on the parsed YAML. The renderer's errors are compared as exact messages.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from sidecar.agent.config import DEFAULT_SOCKET
from tests.deploy.support import ENVOY_DIR, RENDER_PY, load_renderer
from tests.support.envoy import envoy_binary

render = load_renderer()

ISTIO_SOCKET: Final = "/var/run/secrets/workload-spiffe-uds/socket"
AGENT_SOCKET: Final = str(DEFAULT_SOCKET)
FRONTEND: Final = "spiffe://example.org/ns/web/sa/frontend"
BATCH: Final = "spiffe://example.org/ns/batch/sa/report"
BACKEND: Final = "spiffe://example.org/ns/db/sa/backend"
DOWNSTREAM_TLS: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HCM: Final = "envoy.filters.network.http_connection_manager"
AEAD_TLS12: Final = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
}

INBOUND: Final[Mapping[str, str]] = {
    "ADMIN_PORT": "9901",
    "LISTEN_PORT": "8443",
    "APP_PORT": "8080",
    "AGENT_SOCKET": AGENT_SOCKET,
    "ALLOWED_SPIFFE_IDS": f"{FRONTEND},{BATCH}",
}
OUTBOUND: Final[Mapping[str, str]] = {
    "ADMIN_PORT": "9902",
    "LISTEN_PORT": "15001",
    "UPSTREAM_ADDRESS": "backend.db.svc.cluster.local",
    "UPSTREAM_PORT": "8443",
    "UPSTREAM_SPIFFE_ID": BACKEND,
    "AGENT_SOCKET": AGENT_SOCKET,
}
# Every template with sample values; SPIRE-style names and Istio's socket as variants.
SAMPLES: Final[Mapping[str, Mapping[str, Mapping[str, str]]]] = {
    "inbound.yaml.tmpl": {
        "defaults": INBOUND,
        "spire-names": {**INBOUND, "SVID_NAME": BACKEND, "BUNDLE_NAME": "spiffe://example.org"},
        "istio-socket": {**INBOUND, "AGENT_SOCKET": ISTIO_SOCKET, "LISTEN_ADDRESS": "::"},
    },
    "outbound.yaml.tmpl": {
        "defaults": OUTBOUND,
        "federated": {**OUTBOUND, "BUNDLE_NAME": "ALL", "UPSTREAM_ADDRESS": "10.0.0.7"},
        "istio-socket": {**OUTBOUND, "AGENT_SOCKET": ISTIO_SOCKET},
    },
}
CASES: Final = [(template, name) for template, variants in SAMPLES.items() for name in variants]


def render_file(template: str, values: Mapping[str, Any]) -> str:
    text: str = render.render((ENVOY_DIR / template).read_text(), values)
    return text


def envoy_validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own arguments
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "-l", "warning", "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- every file, through the real Envoy -------------------------------------------------------------------


def test_every_template_has_samples() -> None:
    assert sorted(path.name for path in ENVOY_DIR.glob("*.tmpl")) == sorted(SAMPLES)


@pytest.mark.parametrize(("template", "variant"), CASES)
def test_envoy_validates_the_rendered_bootstrap(template: str, variant: str, tmp_path: Path) -> None:
    config = tmp_path / template.removesuffix(".tmpl")
    config.write_text(render_file(template, SAMPLES[template][variant]))
    result = envoy_validate(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{config}' OK" in result.stdout + result.stderr


def test_envoy_validate_is_not_a_rubber_stamp(tmp_path: Path) -> None:
    config = tmp_path / "inbound.yaml"
    text = render_file("inbound.yaml.tmpl", INBOUND)
    config.write_text(text.replace("require_client_certificate: true", "require_client_certificate: yes_please"))
    result = envoy_validate(config)
    assert result.returncode != 0
    assert "require_client_certificate" in result.stdout + result.stderr


# --- the security-relevant fields -------------------------------------------------------------------------


def load(template: str, values: Mapping[str, Any]) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(render_file(template, values))
    return document


def walk(node: Any, key: str) -> Iterator[Any]:
    """Every value under ``key``, anywhere in the document."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key:
                yield value
            yield from walk(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def cluster(document: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in document["static_resources"]["clusters"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def check_common_tls(common: dict[str, Any], *, allowed: list[str]) -> None:
    params = common["tls_params"]
    assert params["tls_minimum_protocol_version"] == "TLSv1_2"
    assert params["tls_maximum_protocol_version"] == "TLSv1_3"
    assert set(params["cipher_suites"]) <= AEAD_TLS12
    assert [c["name"] for c in common["tls_certificate_sds_secret_configs"]] == ["default"]
    combined = common["combined_validation_context"]
    assert combined["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    assert combined["default_validation_context"] == {
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": id_}} for id_ in allowed]
    }
    assert "validation_context" not in common  # no second, static trust store


def check_sidecar_plumbing(document: dict[str, Any], socket: str) -> None:
    assert document["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    sds = cluster(document, "sds-grpc")
    assert sds["type"] == "STATIC"
    [[endpoint]] = [group["lb_endpoints"] for group in sds["load_assignment"]["endpoints"]]
    assert endpoint["endpoint"]["address"] == {"pipe": {"path": socket}}
    options = sds["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    # One sds_config for every secret, so Envoy opens one stream per name; all to the agent.
    configs = list(walk(document, "sds_config"))
    assert len(configs) == 2
    assert all(config == configs[0] for config in configs)
    assert configs[0]["initial_fetch_timeout"] == "0s"
    assert configs[0]["api_config_source"]["grpc_services"] == [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]
    for name in [c["name"] for c in document["static_resources"]["clusters"]]:
        thresholds = cluster(document, name).get("circuit_breakers", {}).get("thresholds")
        assert name == "sds-grpc" or thresholds, f"cluster {name} has no circuit breakers"


def test_inbound_requires_an_allowed_caller_and_forwards_its_id() -> None:
    document = load("inbound.yaml.tmpl", INBOUND)
    [listener] = document["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8443}  # noqa: S104
    [chain] = listener["filter_chains"]
    tls = chain["transport_socket"]["typed_config"]
    assert tls["@type"] == DOWNSTREAM_TLS
    assert tls["require_client_certificate"] is True
    check_common_tls(tls["common_tls_context"], allowed=[FRONTEND, BATCH])
    [manager] = [f["typed_config"] for f in chain["filters"] if f["name"] == HCM]
    assert manager["forward_client_cert_details"] == "SANITIZE_SET"
    assert manager["set_current_client_cert_details"] == {"uri": True}
    app = cluster(document, "local_app")
    [[endpoint]] = [group["lb_endpoints"] for group in app["load_assignment"]["endpoints"]]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8080}
    check_sidecar_plumbing(document, AGENT_SOCKET)


def test_outbound_listens_on_loopback_and_checks_the_upstream_id() -> None:
    document = load("outbound.yaml.tmpl", OUTBOUND)
    [listener] = document["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15001}
    [chain] = listener["filter_chains"]
    assert "transport_socket" not in chain
    [manager] = [f["typed_config"] for f in chain["filters"] if f["name"] == HCM]
    assert manager["forward_client_cert_details"] == "SANITIZE"
    upstream = cluster(document, "upstream")
    [[endpoint]] = [group["lb_endpoints"] for group in upstream["load_assignment"]["endpoints"]]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "backend.db.svc.cluster.local",
        "port_value": 8443,
    }
    tls = upstream["transport_socket"]["typed_config"]
    assert tls["@type"] == UPSTREAM_TLS
    check_common_tls(tls["common_tls_context"], allowed=[BACKEND])
    check_sidecar_plumbing(document, AGENT_SOCKET)


@pytest.mark.parametrize("template", sorted(SAMPLES))
def test_resource_names_can_follow_spire(template: str) -> None:
    values = {**SAMPLES[template]["defaults"], "SVID_NAME": FRONTEND, "BUNDLE_NAME": "ALL"}
    document = load(template, values)
    [svid] = list(walk(document, "tls_certificate_sds_secret_configs"))
    assert [config["name"] for config in svid] == [FRONTEND]
    assert [config["name"] for config in walk(document, "validation_context_sds_secret_config")] == ["ALL"]


def test_allowed_ids_keep_their_order_and_drop_duplicates() -> None:
    for value in [f" {BATCH} ,{FRONTEND},{BATCH},", [BATCH, FRONTEND, BATCH]]:
        document = load("inbound.yaml.tmpl", {**INBOUND, "ALLOWED_SPIFFE_IDS": value})
        [matchers] = list(walk(document, "match_typed_subject_alt_names"))
        assert [m["matcher"]["exact"] for m in matchers] == [BATCH, FRONTEND]


# --- the renderer's errors --------------------------------------------------------------------------------

TEMPLATE_ERRORS: Final = [
    ("port: $PORT\n", 'render: template line 1: a $ must start ${NAME} or be doubled ($$): "$PORT"'),
    ("a: 1\nb: ${X Y}\n", 'render: template line 2: a $ must start ${NAME} or be doubled ($$): "${X Y}"'),
    ("port: ${PORT}\n", 'render: template uses an unknown placeholder: "PORT"'),
    (
        "san: [${ALLOWED_SPIFFE_IDS}]\n",
        "render: ALLOWED_SPIFFE_IDS must stand alone on its line (it becomes a YAML list)",
    ),
]


@pytest.mark.parametrize(("template", "message"), TEMPLATE_ERRORS)
def test_template_errors(template: str, message: str) -> None:
    with pytest.raises(render.RenderError) as caught:
        render.render(template, {"ALLOWED_SPIFFE_IDS": FRONTEND})
    assert str(caught.value) == message


def without(values: Mapping[str, str], *names: str) -> dict[str, str]:
    return {name: value for name, value in values.items() if name not in names}


VALUE_ERRORS: Final[list[tuple[str, Mapping[str, Any], str]]] = [
    ("inbound.yaml.tmpl", without(INBOUND, "APP_PORT"), 'render: missing variable: "APP_PORT"'),
    (
        "inbound.yaml.tmpl",
        without(INBOUND, "LISTEN_PORT", "ALLOWED_SPIFFE_IDS"),
        'render: missing variables: "ALLOWED_SPIFFE_IDS", "LISTEN_PORT"',
    ),
    (
        "outbound.yaml.tmpl",
        without(OUTBOUND, "UPSTREAM_SPIFFE_ID"),
        'render: missing variable: "UPSTREAM_SPIFFE_ID"',
    ),
    (
        "outbound.yaml.tmpl",
        {**OUTBOUND, "APP_PORT": "8080"},
        'render: unknown variable: "APP_PORT" (the template takes ADMIN_PORT, AGENT_SOCKET, BUNDLE_NAME, '
        "LISTEN_PORT, SVID_NAME, UPSTREAM_ADDRESS, UPSTREAM_PORT, UPSTREAM_SPIFFE_ID)",
    ),
    *[
        (
            "inbound.yaml.tmpl",
            {**INBOUND, "ALLOWED_SPIFFE_IDS": empty},
            "render: ALLOWED_SPIFFE_IDS must name at least one SPIFFE ID "
            "(an empty list would admit every caller the bundle trusts)",
        )
        for empty in ["", " , ", []]
    ],
    (
        "inbound.yaml.tmpl",
        {**INBOUND, "ALLOWED_SPIFFE_IDS": f"{FRONTEND},spiffe://example.org"},
        'render: ALLOWED_SPIFFE_IDS must be a SPIFFE ID with a path (spiffe://trust-domain/path): "spiffe://example.org"',
    ),
    (
        "inbound.yaml.tmpl",
        {**INBOUND, "ALLOWED_SPIFFE_IDS": 'spiffe://example.org/a"}, {exact: "spiffe://evil/x'},
        "render: ALLOWED_SPIFFE_IDS must be a SPIFFE ID with a path (spiffe://trust-domain/path): "
        '"spiffe://example.org/a\\"}"',
    ),
    (
        "outbound.yaml.tmpl",
        {**OUTBOUND, "UPSTREAM_SPIFFE_ID": "spiffe://Example.org/db"},
        'render: UPSTREAM_SPIFFE_ID must be a SPIFFE ID with a path (spiffe://trust-domain/path): "spiffe://Example.org/db"',
    ),
    (
        "outbound.yaml.tmpl",
        {**OUTBOUND, "UPSTREAM_SPIFFE_ID": "spiffe://example.org/a/../db"},
        "render: UPSTREAM_SPIFFE_ID must be a SPIFFE ID with a path (spiffe://trust-domain/path): "
        '"spiffe://example.org/a/../db"',
    ),
    (
        "outbound.yaml.tmpl",
        {**OUTBOUND, "UPSTREAM_SPIFFE_ID": [BACKEND]},
        "render: UPSTREAM_SPIFFE_ID takes one value, not a list: \"['spiffe://example.org/ns/db/sa/backend']\"",
    ),
    (
        "inbound.yaml.tmpl",
        {**INBOUND, "APP_PORT": "65536"},
        'render: APP_PORT must be a port number from 0 to 65535: "65536"',
    ),
    (
        "inbound.yaml.tmpl",
        {**INBOUND, "APP_PORT": "80\n"},
        'render: APP_PORT must be a port number from 0 to 65535: "80\\n"',
    ),
    (
        "outbound.yaml.tmpl",
        {**OUTBOUND, "AGENT_SOCKET": "run/agent.sock"},
        "render: AGENT_SOCKET must be an absolute path of letters, digits and ._/@+- at most 107 bytes long "
        '(a unix socket): "run/agent.sock"',
    ),
    (
        "outbound.yaml.tmpl",
        {**OUTBOUND, "AGENT_SOCKET": "/" + "s" * 107},
        "render: AGENT_SOCKET must be an absolute path of letters, digits and ._/@+- at most 107 bytes long "
        f'(a unix socket): "/{"s" * 107}"',
    ),
    (
        "outbound.yaml.tmpl",
        {**OUTBOUND, "UPSTREAM_ADDRESS": "db.example.org:5432"},
        'render: UPSTREAM_ADDRESS must be a DNS name or an IP address: "db.example.org:5432"',
    ),
    (
        "outbound.yaml.tmpl",
        {**OUTBOUND, "BUNDLE_NAME": "ROOTCA # all"},
        'render: BUNDLE_NAME must be an SDS resource name (letters, digits and ._:/-): "ROOTCA # all"',
    ),
]


@pytest.mark.parametrize(("template", "values", "message"), VALUE_ERRORS)
def test_value_errors(template: str, values: Mapping[str, Any], message: str) -> None:
    with pytest.raises(render.RenderError) as caught:
        render_file(template, values)
    assert str(caught.value) == message


def test_values_are_normalised() -> None:
    document = load("outbound.yaml.tmpl", {**OUTBOUND, "LISTEN_PORT": "015001", "UPSTREAM_ADDRESS": "2001:DB8:0::7"})
    [listener] = document["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == 15001
    [address] = list(walk(cluster(document, "upstream"), "socket_address"))
    assert address["address"] == "2001:db8::7"


# --- the command line -------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own arguments
        [sys.executable, str(RENDER_PY), *args], capture_output=True, text=True, cwd=cwd, timeout=30, check=False
    )


def test_cli_renders_a_template_by_name_from_anywhere(tmp_path: Path) -> None:
    assignments = [f"{name}={value}" for name, value in INBOUND.items()]
    result = run_cli("inbound.yaml.tmpl", *assignments, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == render_file("inbound.yaml.tmpl", INBOUND)
    written = run_cli(str(ENVOY_DIR / "inbound.yaml.tmpl"), *assignments, "-o", "out.yaml", cwd=tmp_path)
    assert (written.returncode, written.stdout, written.stderr) == (0, "", "")
    assert (tmp_path / "out.yaml").read_text() == result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["ADMIN_PORT=1"],
            'missing variables: "AGENT_SOCKET", "LISTEN_PORT", "UPSTREAM_ADDRESS", "UPSTREAM_PORT", '
            '"UPSTREAM_SPIFFE_ID"',
        ),
        (["ADMIN_PORT"], 'a variable is given as NAME=value: "ADMIN_PORT"'),
        (["ADMIN_PORT=1", "ADMIN_PORT=2"], 'variable given twice: "ADMIN_PORT"'),
    ],
)
def test_cli_errors_name_the_template_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_cli("outbound.yaml.tmpl", *args, cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"outbound.yaml.tmpl: render: {message}\n")


# --- the README -------------------------------------------------------------------------------------------


def test_readme_names_the_sockets_the_templates_and_every_variable() -> None:
    readme = (ENVOY_DIR / "README.md").read_text()
    assert AGENT_SOCKET in readme
    assert ISTIO_SOCKET in readme
    for name in [*SAMPLES, "render.py"]:
        assert f"`{name}`" in readme, name
    for variable in render.VARIABLES:
        assert f"`{variable}`" in readme, variable
