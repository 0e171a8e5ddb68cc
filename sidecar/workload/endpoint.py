"""Where the Workload API listens: parsing endpoint addresses (SPIFFE Workload Endpoint, section 4).

An address is one of:

- ``unix:///abs/path.sock``: a unix socket; the URI has no authority, an absolute path and nothing
  else. ``unix:/abs/path.sock`` (the same URI without the empty authority) is accepted too, as is a
  bare absolute path ``/abs/path.sock``.
- ``tcp://<IP>:<port>``: the host must be an IP address (no name resolution: the endpoint must not
  be reachable through DNS tricks), the port is required, and nothing else may be present.

The address is taken from the explicit argument, else from ``SPIFFE_ENDPOINT_SOCKET``, else it is
:data:`DEFAULT_ADDRESS`. Pure: no I/O; the environment is passed in.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import SplitResult, urlsplit

from spiffecore import SpiffeError

ENDPOINT_ENV: Final = "SPIFFE_ENDPOINT_SOCKET"
DEFAULT_SOCKET_PATH: Final = "/tmp/spiffe-agent/public/api.sock"  # noqa: S108 - the agent's documented default
DEFAULT_ADDRESS: Final = "unix://" + DEFAULT_SOCKET_PATH

EMPTY: Final = "address must not be empty"
BAD_SCHEME: Final = "address must be a unix:// or tcp:// URI, or an absolute socket path"
UNIX_AUTHORITY: Final = "unix socket URI must not include an authority (want unix:///absolute/path)"
UNIX_NO_PATH: Final = "unix socket URI must include a path"
UNIX_RELATIVE: Final = "unix socket path must be absolute"
UNIX_QUERY: Final = "unix socket URI must not include query values"
UNIX_FRAGMENT: Final = "unix socket URI must not include a fragment"
UNIX_PERCENT: Final = "unix socket path must not include percent-encoded characters"
TCP_OPAQUE: Final = "tcp socket URI must not be opaque (want tcp://IP:port)"
TCP_USERINFO: Final = "tcp socket URI must not include user info"
TCP_NO_HOST: Final = "tcp socket URI must include a host"
TCP_PATH: Final = "tcp socket URI must not include a path"
TCP_QUERY: Final = "tcp socket URI must not include query values"
TCP_FRAGMENT: Final = "tcp socket URI must not include a fragment"
TCP_HOST_NOT_IP: Final = "tcp socket URI host must be an IP address"
TCP_NO_PORT: Final = "tcp socket URI must include a port"
TCP_BAD_PORT: Final = "tcp socket URI port must be a number from 1 to 65535"


class EndpointError(SpiffeError, ValueError):
    """A Workload API address breaks the Workload Endpoint rules."""

    layer = "workload endpoint"


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """A parsed Workload API address: a unix socket ``path``, or a TCP ``host`` (an IP) and ``port``."""

    scheme: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    @property
    def target(self) -> str:
        """The gRPC target: ``unix:/path``, ``ipv4:1.2.3.4:80`` or ``ipv6:[::1]:80`` (never resolved by DNS)."""
        if self.scheme == "unix":
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"ipv6:[{self.host}]:{self.port}"
        return f"ipv4:{self.host}:{self.port}"

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_endpoint(address: str) -> Endpoint:
    """Parse a Workload API address; :class:`EndpointError` quotes the input and names the broken rule."""
    if not address:
        raise EndpointError(EMPTY, address)
    if address.startswith("/"):
        return _unix(address, urlsplit("unix://" + address, allow_fragments=True))
    try:
        parts = urlsplit(address)
    except ValueError as err:  # such as an unbalanced "[" in the host
        raise EndpointError(f"address is not a valid URI ({err})", address) from err
    if parts.scheme == "unix":
        return _unix(address, parts)
    if parts.scheme == "tcp":
        return _tcp(address, parts)
    raise EndpointError(BAD_SCHEME, address)


def resolve_endpoint(address: str | None = None, *, environ: Mapping[str, str] | None = None) -> Endpoint:
    """The endpoint to use: ``address`` if given, else ``SPIFFE_ENDPOINT_SOCKET`` (if set and not
    empty), else :data:`DEFAULT_ADDRESS`. An invalid environment value says where it came from."""
    if address is not None:
        return parse_endpoint(address)
    value = (os.environ if environ is None else environ).get(ENDPOINT_ENV, "")
    if not value:
        return parse_endpoint(DEFAULT_ADDRESS)
    try:
        return parse_endpoint(value)
    except EndpointError as err:
        raise EndpointError(f"{err.rule} (from {ENDPOINT_ENV})", value) from err


def grpc_target(address: str | None = None, *, environ: Mapping[str, str] | None = None) -> str:
    """The gRPC target of :func:`resolve_endpoint`."""
    return resolve_endpoint(address, environ=environ).target


def _unix(address: str, parts: SplitResult) -> Endpoint:
    if parts.netloc:
        raise EndpointError(UNIX_AUTHORITY, address)
    if "?" in address:
        raise EndpointError(UNIX_QUERY, address)
    if "#" in address:
        raise EndpointError(UNIX_FRAGMENT, address)
    if not parts.path:
        raise EndpointError(UNIX_NO_PATH, address)
    if not parts.path.startswith("/"):
        raise EndpointError(UNIX_RELATIVE, address)
    if "%" in parts.path:
        # gRPC would percent-decode a unix: target's path: refuse rather than guess which file is meant.
        raise EndpointError(UNIX_PERCENT, address)
    # "unix:////a" has the path "//a", which gRPC would read as an authority: keep one leading slash.
    return Endpoint(scheme="unix", path="/" + parts.path.lstrip("/"))


def _tcp(address: str, parts: SplitResult) -> Endpoint:
    if not parts.netloc:
        raise EndpointError(TCP_OPAQUE if parts.path and not parts.path.startswith("/") else TCP_NO_HOST, address)
    if "@" in parts.netloc:
        raise EndpointError(TCP_USERINFO, address)
    if parts.path:
        raise EndpointError(TCP_PATH, address)
    if "?" in address:
        raise EndpointError(TCP_QUERY, address)
    if "#" in address:
        raise EndpointError(TCP_FRAGMENT, address)
    host = parts.hostname or ""
    if not host:
        raise EndpointError(TCP_NO_HOST, address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise EndpointError(TCP_HOST_NOT_IP, address) from None
    try:
        port = parts.port
    except ValueError:
        raise EndpointError(TCP_BAD_PORT, address) from None
    if port is None:
        raise EndpointError(TCP_NO_PORT, address)
    if port == 0:
        raise EndpointError(TCP_BAD_PORT, address)
    return Endpoint(scheme="tcp", host=str(ip), port=port)
