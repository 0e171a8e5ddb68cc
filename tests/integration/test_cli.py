"""The CLI as a separate process: malformed input is refused clearly and changes nothing; so is a bad config."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.server import ServerProcess, run_cli

ENTRY = ("entry", "create", "--spiffe-id", "spiffe://example.org/cli/web", "--parent-id", "spiffe://example.org/node")


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        pytest.param(
            (
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/a//b",
                "--parent-id",
                "spiffe://example.org/n",
                "--selector",
                "unix:uid:1",
            ),
            1,
            "spiffe-server: entry: --spiffe-id is not a valid SPIFFE ID (path cannot contain empty segments): "
            '"spiffe://example.org/a//b"\n',
            id="bad SPIFFE ID",
        ),
        pytest.param(
            (*ENTRY, "--selector", "nocolon"),
            1,
            'spiffe-server: entry: selector must be TYPE:VALUE: "nocolon"\n',
            id="selector without a colon",
        ),
        pytest.param(
            (*ENTRY, "--selector", "unix:uid:1", "--bogus"),
            2,
            "spiffe-server: error: unrecognized arguments: --bogus\n",
            id="unknown flag",
        ),
        pytest.param(
            (
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://other.org/web",
                "--parent-id",
                "spiffe://other.org/node",
                "--selector",
                "unix:uid:1",
            ),
            1,
            'spiffe-server: entry: entry SPIFFE ID must be in trust domain example.org: "spiffe://other.org/web"\n',
            id="another trust domain",
        ),
        pytest.param(
            (*ENTRY, "--selector", "unix:uid:1"),
            1,
            'spiffe-server: store: similar entry already exists: "spiffe://example.org/cli/web"\n',
            id="duplicate entry",
        ),
        pytest.param(
            (*ENTRY, "--selector", "unix:uid:2", "--x509-ttl", "99999999"),
            1,
            "spiffe-server: entry: x509_svid_ttl must be a whole number of seconds from 0 (server default) to "
            '31622400: "99999999"\n',
            id="TTL out of range",
        ),
    ],
)
def test_malformed_input_is_refused_and_changes_nothing(
    server: ServerProcess, argv: tuple[str, ...], code: int, message: str
) -> None:
    if not server.cli_json("entry", "show", "--spiffe-id", "spiffe://example.org/cli/web"):
        server.cli(*ENTRY, "--selector", "unix:uid:1")  # what the duplicate duplicates
    before = server.entry_count()
    result = server.cli(*argv, check=False)
    assert (result.returncode, result.stdout) == (code, "")
    assert result.stderr.endswith(message), result.stderr
    assert server.entry_count() == before


def test_an_unknown_config_key_is_named_with_its_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "bad.yaml"
    config.write_text(f"trust_domain: example.org\ndata_dir: {state}\nsvid:\n  x509_ttl: 1h\n  bogus_key: 3\n")
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr == (
        f'spiffe-server: config: {config}:5: unknown key "bogus_key" in "svid" (known: x509_ttl, jwt_ttl, agent_ttl)\n'
    )
    assert not state.exists()


def test_an_svid_ttl_above_a_sixth_of_the_ca_ttl_is_explained(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "ttl.yaml"
    config.write_text(f"trust_domain: example.org\ndata_dir: {state}\nca:\n  ttl: 6h\nsvid:\n  x509_ttl: 2h\n")
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 2
    assert "x509_svid_ttl 2h is too long for ca_ttl 6h" in result.stderr
    assert (
        "SVIDs get their full TTL only up to 1h; lower x509_svid_ttl to at most 1h or raise ca_ttl to at least 12h"
        in (result.stderr)
    )
    assert not state.exists()
    assert list(tmp_path.iterdir()) == [config]
