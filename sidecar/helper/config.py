"""``helper.yaml``: what helper mode writes, where, with which modes, and whom it tells.

Loaded by :func:`spiffeops.config.load_config`, so every unknown key is an error naming the key and
its line, and the flags of ``spiffe-agent helper`` arrive as overrides. File modes are integers:
write them in octal with a leading zero (``0644``), which YAML reads as octal. Signals are names
(``SIGHUP`` or ``HUP``) or numbers.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePath
from signal import Signals
from typing import Final, Literal

from spiffeops.config import Duration
from spiffeops.status import AddressError, parse_host_port

DEFAULT_SVID_FILE: Final = "svid.pem"
DEFAULT_KEY_FILE: Final = "svid_key.pem"
DEFAULT_BUNDLE_FILE: Final = "bundle.pem"
DEFAULT_CERT_MODE: Final = 0o644
DEFAULT_KEY_MODE: Final = 0o600
DEFAULT_ONCE_TIMEOUT: Final = timedelta(seconds=30)


def parse_signal(text: str) -> Signals:
    """``"SIGHUP"``, ``"HUP"``, ``"sighup"`` or ``"1"`` as a signal; ``ValueError`` naming the input."""
    name = text.strip().upper()
    if name.isdigit():
        try:
            return Signals(int(name))
        except ValueError:
            raise ValueError(f"unknown signal {text!r}") from None
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name.startswith("SIG_"):  # SIG_DFL, SIG_IGN, SIG_BLOCK ... are not signals
        raise ValueError(f"unknown signal {text!r}")
    try:
        return Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal {text!r}") from None


def _check_file_name(key: str, name: str) -> None:
    if not name or name in {".", ".."} or PurePath(name).name != name:
        raise ValueError(f"{key} must be a plain file name inside cert_dir, got {name!r}")


def _check_mode(key: str, mode: int) -> None:
    if not 0 <= mode <= 0o777:
        raise ValueError(
            f"{key} must be permission bits from 0 to 0777, written in octal with a leading zero "
            f"(like 0644), got {mode} (0o{mode:o})"
        )
    if not mode & 0o400:
        raise ValueError(f"{key} must let the owner read the file, got 0{mode:03o}")


@dataclass(frozen=True, slots=True, kw_only=True)
class JWTSVIDFile:
    """One JWT-SVID to keep fresh in a file (the token alone, no newline)."""

    audience: str
    file_name: str
    extra_audiences: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.audience:
            raise ValueError("audience must not be empty")
        if any(not extra for extra in self.extra_audiences):
            raise ValueError("extra_audiences must not contain an empty audience")
        _check_file_name("file_name", self.file_name)

    @property
    def audiences(self) -> tuple[str, ...]:
        return (self.audience, *self.extra_audiences)


@dataclass(frozen=True, slots=True, kw_only=True)
class HelperConfig:
    """Every key of ``helper.yaml``; the defaults are those of spiffe-helper where it has one."""

    # The Workload API: unix:///path, unix:/path, a path, or tcp://IP:port. Unset: $SPIFFE_ENDPOINT_SOCKET,
    # then the agent's default socket.
    socket: str | None = None
    cert_dir: Path
    svid_file_name: str = DEFAULT_SVID_FILE
    svid_key_file_name: str = DEFAULT_KEY_FILE
    svid_bundle_file_name: str = DEFAULT_BUNDLE_FILE
    # One file with the private key, then the leaf and intermediates (HAProxy, and nginx or
    # Mosquitto pointed twice at it); written with key_file_mode. Off when unset.
    combined_file_name: str | None = None
    # Append the roots of every federated trust domain to the bundle file.
    include_federated_bundles: bool = False
    # Of several identities, the one whose entry has this hint (X.509 and JWT); else the default.
    hint: str | None = None
    jwt_svids: tuple[JWTSVIDFile, ...] = ()
    # A JSON object: trust domain name -> its JWKS (own and federated), written with cert_file_mode.
    jwt_bundle_file_name: str | None = None
    cert_file_mode: int = DEFAULT_CERT_MODE
    key_file_mode: int = DEFAULT_KEY_MODE
    # After every update, send `signal` to the process whose pid is in this file (re-read each time).
    pid_file: Path | None = None
    signal: str | None = None
    # A command started after the first write; on later updates sent `renew_signal`, or restarted.
    cmd: str | None = None
    cmd_args: tuple[str, ...] = ()
    renew_signal: str | None = None
    # Write the files once and exit 0; exit 1 if there is no SVID within once_timeout.
    once: bool = False
    once_timeout: Duration = DEFAULT_ONCE_TIMEOUT
    # HOST:PORT for /healthz and /readyz (ready: every file written and nothing in them expired).
    health: str | None = None
    log_format: Literal["text", "json"] = "text"
    log_level: str = "info"

    def __post_init__(self) -> None:
        names = {
            "svid_file_name": self.svid_file_name,
            "svid_key_file_name": self.svid_key_file_name,
            "svid_bundle_file_name": self.svid_bundle_file_name,
        }
        if self.combined_file_name is not None:
            names["combined_file_name"] = self.combined_file_name
        if self.jwt_bundle_file_name is not None:
            names["jwt_bundle_file_name"] = self.jwt_bundle_file_name
        for index, jwt in enumerate(self.jwt_svids):
            names[f"jwt_svids[{index}].file_name"] = jwt.file_name
        seen: dict[str, str] = {}
        for key, name in names.items():
            _check_file_name(key, name)
            if name in seen:
                raise ValueError(f"{key} and {seen[name]} name the same file {name!r}")
            seen[name] = key
        _check_mode("cert_file_mode", self.cert_file_mode)
        _check_mode("key_file_mode", self.key_file_mode)
        if self.key_file_mode & 0o007:
            raise ValueError(
                f"key_file_mode must give others no access to the private key, got 0{self.key_file_mode:03o}"
            )
        if self.hint == "":
            raise ValueError("hint must not be empty (leave it out for the default identity)")
        if (self.pid_file is None) != (self.signal is None):
            raise ValueError("pid_file and signal must be set together")
        for key, value in (("signal", self.signal), ("renew_signal", self.renew_signal)):
            if value is not None:
                try:
                    parse_signal(value)
                except ValueError as err:
                    raise ValueError(f"{key}: {err}") from err
        if self.cmd is not None and not self.cmd.strip():
            raise ValueError("cmd must not be empty")
        if self.cmd is None and (self.cmd_args or self.renew_signal is not None):
            raise ValueError("cmd_args and renew_signal need cmd")
        if self.once and (self.cmd is not None or self.health is not None):
            raise ValueError("once writes the files and exits: it takes neither cmd nor health")
        if self.once_timeout <= timedelta(0):
            raise ValueError("once_timeout must be positive")
        if self.health is not None:
            try:
                parse_host_port(self.health)
            except AddressError as err:
                raise ValueError(f"health: {err}") from err

    @property
    def pid_signal(self) -> Signals | None:
        return parse_signal(self.signal) if self.signal is not None else None

    @property
    def cmd_renew_signal(self) -> Signals | None:
        return parse_signal(self.renew_signal) if self.renew_signal is not None else None


def split_command(text: str) -> tuple[str, tuple[str, ...]]:
    """``--cmd "nginx -g 'daemon off;'"``: the program and its arguments, split as a POSIX shell would."""
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise ValueError(f"--cmd cannot be split into words: {err}") from err
    if not words:
        raise ValueError("--cmd must not be empty")
    return words[0], tuple(words[1:])
