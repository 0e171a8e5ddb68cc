"""The console scripts are installed and answer --help and --version, as separate processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

COMMANDS = ("spiffe-server", "spiffe-agent", "spiffe-proxy")


def _script(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found is not None, f"{name} is not installed beside {sys.executable}"
    return found


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603


@pytest.mark.parametrize("command", COMMANDS)
def test_help_describes_the_command(command: str) -> None:
    result = _run(_script(command), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {command}")
    assert f"{command}: the spiffe-sidecar" in result.stdout or f"{command}: an mTLS" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_version(command: str) -> None:
    result = _run(_script(command), "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{command} {version('spiffe-sidecar')}"


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("spiffe-server", "the following arguments are required: COMMAND"),
        ("spiffe-agent", "the following arguments are required: COMMAND"),
        ("spiffe-proxy", "the following arguments are required: --listen, --upstream"),
    ],
)
def test_without_a_command_it_says_so_and_fails(command: str, says: str) -> None:
    result = _run(_script(command))
    assert result.returncode == 2
    assert says in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ("spiffe-server", "run", "--no-such-flag"),
        ("spiffe-agent", "run", "--no-such-flag"),
        ("spiffe-proxy", "--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:2", "--no-such-flag"),
    ],
)
def test_unknown_flags_are_errors(argv: tuple[str, ...]) -> None:
    result = _run(_script(argv[0]), *argv[1:])
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr
