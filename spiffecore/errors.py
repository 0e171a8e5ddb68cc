"""The error hierarchy of the SPIFFE core.

Every error raised by ``spiffecore`` derives from :class:`SpiffeError`. Messages are lower-case,
start with the layer that raised them (``spiffeid:``, ``x509svid:``, ...), state the rule that was
broken and, where it is safe, quote the offending input. Secrets (private keys, whole tokens) are
never quoted.
"""

from __future__ import annotations

import json
from typing import Final

_QUOTE_LIMIT: Final = 200
_NO_VALUE: Final = object()


def quote(value: object, *, limit: int = _QUOTE_LIMIT) -> str:
    """Quote untrusted input for an error message or log line.

    Strings are JSON-escaped (so control characters cannot forge log lines) and cut to ``limit``
    characters with a note of the full length, so a hostile multi-megabyte input cannot blow up a
    log.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        shown = raw[:limit].hex()
        suffix = f"... ({len(raw)} bytes)" if len(raw) > limit else ""
        return f"0x{shown}{suffix}"
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        return json.dumps(text[:limit]) + f"... ({len(text)} characters)"
    return json.dumps(text)


class SpiffeError(Exception):
    """Root of every error the SPIFFE core raises.

    ``rule`` is the broken rule in words; ``value`` is the input that broke it when it is safe to
    show. Subclasses set ``layer``, the prefix of the message.
    """

    layer = "spiffe"

    def __init__(self, rule: str, value: object = _NO_VALUE) -> None:
        # ``args`` holds exactly what rebuilds the error, so pickle and copy (multiprocessing, logging
        # handlers in other processes) reproduce it: ``(rule,)`` without a value, ``(rule, value)``
        # with one, even when that value is ``None``.
        if value is _NO_VALUE:
            super().__init__(rule)
        else:
            super().__init__(rule, value)
        self.rule = rule
        self.value = None if value is _NO_VALUE else value

    def __str__(self) -> str:
        message = f"{self.layer}: {self.rule}"
        if len(self.args) > 1:
            message = f"{message}: {quote(self.value)}"
        return message


class SpiffeIDError(SpiffeError, ValueError):
    """A SPIFFE ID or trust domain name breaks the SPIFFE-ID specification."""

    layer = "spiffeid"


class X509SVIDError(SpiffeError, ValueError):
    """An X.509-SVID (certificate chain or private key) is malformed or breaks the X509-SVID rules."""

    layer = "x509svid"


class JWTSVIDError(SpiffeError, ValueError):
    """A JWT-SVID is malformed, badly signed, expired, or not meant for this audience."""

    layer = "jwtsvid"


class BundleError(SpiffeError, ValueError):
    """A trust bundle or bundle map is malformed."""

    layer = "bundle"


class BundleNotFoundError(BundleError, LookupError):
    """No bundle is known for the trust domain asked for."""


class VerificationError(SpiffeError):
    """An X.509-SVID did not verify against the bundle of its trust domain."""

    layer = "x509svid"


class AuthorizationError(SpiffeError):
    """A verified peer is not allowed by the authorization policy.

    The message names the peer and why: ``authorize: "spiffe://td/x" is not allowed: want ...``.
    """

    layer = "authorize"

    def __init__(self, peer: object, reason: str) -> None:
        peer_text = str(peer)
        Exception.__init__(self, peer_text, reason)  # (peer, reason): what rebuilds it after pickle or copy
        self.rule = reason
        self.value = peer_text

    def __str__(self) -> str:
        return f"{self.layer}: {quote(self.value)} is not allowed: {self.rule}"


class PolicyError(SpiffeError, ValueError):
    """An authorization rule (such as an ID pattern) is malformed."""

    layer = "authorize"


class TLSConfigError(SpiffeError, ValueError):
    """A TLS context could not be built from the given SVID and bundles."""

    layer = "tls"
