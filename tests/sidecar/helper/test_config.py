"""helper.yaml and the flags of ``spiffe-agent helper``."""

from __future__ import annotations

import signal
from datetime import timedelta
from pathlib import Path

import pytest

from sidecar.cli import build_parser, load_helper_config
from sidecar.helper.config import HelperConfig, JWTSVIDFile, parse_signal, split_command
from spiffeops.config import ConfigError, load_config, parse_config

FULL = """\
socket: unix:///run/agent.sock
cert_dir: /certs
svid_file_name: cert.pem
svid_key_file_name: key.pem
svid_bundle_file_name: ca.pem
combined_file_name: all.pem
include_federated_bundles: true
hint: internal
jwt_svids:
  - audience: db
    extra_audiences: [db2]
    file_name: db.jwt
jwt_bundle_file_name: jwks.json
cert_file_mode: 0640
key_file_mode: 0640
pid_file: /run/nginx.pid
signal: SIGHUP
cmd: /usr/bin/app
cmd_args: ["-c", "x y"]
renew_signal: USR1
once_timeout: 10s
health: 127.0.0.1:8088
log_format: json
log_level: debug
"""


def test_every_key_is_read() -> None:
    config = parse_config(FULL, HelperConfig)
    assert config.socket == "unix:///run/agent.sock"
    assert config.cert_dir == Path("/certs")
    assert (config.svid_file_name, config.svid_key_file_name, config.svid_bundle_file_name) == (
        "cert.pem",
        "key.pem",
        "ca.pem",
    )
    assert config.combined_file_name == "all.pem"
    assert config.include_federated_bundles
    assert config.jwt_svids == (JWTSVIDFile(audience="db", extra_audiences=("db2",), file_name="db.jwt"),)
    assert config.jwt_svids[0].audiences == ("db", "db2")
    assert config.cert_file_mode == config.key_file_mode == 0o640
    assert config.pid_signal == signal.SIGHUP
    assert (config.cmd, config.cmd_args, config.cmd_renew_signal) == ("/usr/bin/app", ("-c", "x y"), signal.SIGUSR1)
    assert config.once_timeout == timedelta(seconds=10)
    assert (config.health, config.log_format, config.log_level) == ("127.0.0.1:8088", "json", "debug")


def test_defaults_are_spiffe_helpers() -> None:
    config = parse_config("cert_dir: /certs", HelperConfig)
    assert (config.svid_file_name, config.svid_key_file_name, config.svid_bundle_file_name) == (
        "svid.pem",
        "svid_key.pem",
        "bundle.pem",
    )
    assert (config.cert_file_mode, config.key_file_mode) == (0o644, 0o600)
    assert config.socket is None
    assert config.combined_file_name is None
    assert not config.once
    assert config.once_timeout == timedelta(seconds=30)


def test_an_unknown_key_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "helper.yaml"
    path.write_text("cert_dir: /certs\nrenew_signal_name: SIGHUP\n")
    with pytest.raises(ConfigError, match=r'helper.yaml:2: unknown key "renew_signal_name" \(known: socket, '):
        load_config(path, HelperConfig)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'missing required key "cert_dir"'),
        (
            "cert_dir: /c\ncert_file_mode: 644",
            r"cert_file_mode must be permission bits from 0 to 0777, written in octal",
        ),
        ("cert_dir: /c\nkey_file_mode: 0604", "key_file_mode must give others no access to the private key, got 0604"),
        ("cert_dir: /c\ncert_file_mode: 0244", "cert_file_mode must let the owner read the file, got 0244"),
        ("cert_dir: /c\nsvid_file_name: ../x.pem", "svid_file_name must be a plain file name inside cert_dir"),
        ("cert_dir: /c\ncombined_file_name: svid.pem", "combined_file_name and svid_file_name name the same file"),
        ("cert_dir: /c\npid_file: /run/x.pid", "pid_file and signal must be set together"),
        ("cert_dir: /c\npid_file: /p\nsignal: SIGNOPE", "signal: unknown signal 'SIGNOPE'"),
        ("cert_dir: /c\nrenew_signal: HUP", "cmd_args and renew_signal need cmd"),
        (
            "cert_dir: /c\nonce: true\ncmd: /bin/true",
            "once writes the files and exits: it takes neither cmd nor health",
        ),
        ("cert_dir: /c\nhealth: nowhere", "health: status: invalid address"),
        ("cert_dir: /c\njwt_svids: [{audience: '', file_name: a}]", "audience must not be empty"),
        ("cert_dir: /c\nhint: ''", "hint must not be empty"),
    ],
)
def test_invalid_configs_are_explained(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, HelperConfig)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("SIGHUP", signal.SIGHUP), ("hup", signal.SIGHUP), ("USR2", signal.SIGUSR2), ("15", signal.SIGTERM)],
)
def test_signals_by_name_or_number(text: str, expected: signal.Signals) -> None:
    assert parse_signal(text) == expected


@pytest.mark.parametrize("text", ["SIG_IGN", "NOPE", "999", ""])
def test_unknown_signals(text: str) -> None:
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal(text)


def test_cmd_is_split_like_a_shell() -> None:
    assert split_command("nginx -g 'daemon off;'") == ("nginx", ("-g", "daemon off;"))
    with pytest.raises(ValueError, match="--cmd cannot be split into words"):
        split_command("nginx 'unclosed")


def _args(*argv: str) -> HelperConfig:
    return load_helper_config(build_parser().parse_args(["helper", *argv]))


def test_flags_alone(tmp_path: Path) -> None:
    config = _args(
        "--cert-dir", str(tmp_path), "--socket", "/run/a.sock", "--pid-file", "/run/p", "--signal", "SIGHUP", "--once"
    )
    assert config.cert_dir == tmp_path
    assert config.socket == "/run/a.sock"
    assert config.pid_file == Path("/run/p")
    assert config.pid_signal == signal.SIGHUP
    assert config.once


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "helper.yaml"
    path.write_text("cert_dir: /from-file\ncmd: old\nhealth: 127.0.0.1:1\n")
    config = _args("--config", str(path), "--cert-dir", str(tmp_path), "--cmd", "python3 -m http.server 'x y'")
    assert config.cert_dir == tmp_path
    assert (config.cmd, config.cmd_args) == ("python3", ("-m", "http.server", "x y"))
    assert config.health == "127.0.0.1:1"


def test_cert_dir_is_required_without_a_file() -> None:
    with pytest.raises(ConfigError, match="--cert-dir is required when no --config file is given"):
        _args("--once")
