"""The proxy's errors: one root, :class:`ProxyError`, under :class:`spiffecore.SpiffeError`."""

from __future__ import annotations

from spiffecore import SpiffeError


class ProxyError(SpiffeError):
    """Root of the errors the proxy raises."""

    layer = "proxy"


class ProxyConfigError(ProxyError, ValueError):
    """The proxy is configured in a way that is malformed or unsafe (an address, a policy, files)."""


class HandshakeError(ProxyError):
    """A TLS handshake failed, timed out, or the peer was not authenticated or not authorized."""
