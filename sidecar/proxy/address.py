"""Listen and upstream addresses: ``host:port``, ``[v6]:port`` and ``unix:/path``.

A plaintext side (the upstream in server mode, the listener in client mode) carries unencrypted,
unauthenticated bytes, so it must stay on this machine: a unix socket or a loopback address.
:func:`check_plaintext` enforces that unless the operator says otherwise (``--unsafe-upstream``,
``--unsafe-listen``). ``localhost`` counts as loopback, as in ghostunnel; other names do not,
since what they resolve to can change.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from sidecar.proxy.errors import ProxyConfigError

UNIX_PREFIX: Final = "unix:"
LOOPBACK_NAMES: Final = frozenset({"localhost"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Address:
    """A TCP ``host`` and ``port``, or a unix socket ``path``; built by :meth:`parse`."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __post_init__(self) -> None:
        if bool(self.path) == bool(self.host):
            raise ProxyConfigError("an address is either a unix socket path or a host and port", str(self))
        if self.path and not self.path.startswith("/"):
            raise ProxyConfigError("a unix socket path must be absolute", self.path)
        if self.host and not 0 <= self.port <= 65535:
            raise ProxyConfigError("port must be between 0 and 65535", self.port)

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``host:port``, ``[v6]:port`` or ``unix:/path``; raise :class:`ProxyConfigError`."""
        if text.startswith(UNIX_PREFIX):
            path = text[len(UNIX_PREFIX) :]
            if not path.startswith("/") or "\x00" in path:
                raise ProxyConfigError("unix socket address must be unix:/absolute/path", text)
            return cls(path=path)
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ProxyConfigError("address must be host:port, [v6]:port or unix:/path", text)
        if host.startswith("["):
            if not host.endswith("]"):
                raise ProxyConfigError("IPv6 address must be in brackets: [v6]:port", text)
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError as err:
                raise ProxyConfigError("not a valid IPv6 address", text) from err
        elif ":" in host:
            raise ProxyConfigError("IPv6 address must be in brackets: [v6]:port", text)
        if not port_text.isascii() or not port_text.isdigit():
            raise ProxyConfigError("port must be a decimal number", text)
        port = int(port_text)
        if port > 65535:
            raise ProxyConfigError("port must be between 0 and 65535", text)
        if any(c.isspace() or c in "/[]" for c in host):
            raise ProxyConfigError("host name has characters a host name cannot have", text)
        return cls(host=host, port=port)

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    @property
    def is_loopback(self) -> bool:
        """A unix socket, ``localhost``, or a loopback IP address (127.0.0.0/8, ::1)."""
        if self.is_unix:
            return True
        if self.host.lower() in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.path:
            return UNIX_PREFIX + self.path
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def check_plaintext(address: Address, *, role: str, unsafe_flag: str, allow_unsafe: bool = False) -> None:
    """Refuse a plaintext ``address`` that leaves this machine, unless ``allow_unsafe``.

    ``role`` ("upstream", "listen address") and ``unsafe_flag`` name the address and the flag
    that overrides the rule in the message.
    """
    if allow_unsafe or address.is_loopback:
        return
    raise ProxyConfigError(
        f"plaintext {role} must be a unix socket or a loopback address (use {unsafe_flag} to allow it)",
        str(address),
    )
