"""The errors of the control plane's certificate authority.

Both carry the layer ``ca`` and follow ``spiffecore``'s conventions: lower-case, the broken rule,
then the quoted input (a file name, an ID, a key type; never key material).
"""

from __future__ import annotations

from spiffecore import SpiffeError


class CAError(SpiffeError):
    """The CA could not load, create, persist or use an authority, or was asked to sign something it must not."""

    layer = "ca"


class CAConfigError(CAError, ValueError):
    """The CA's configuration cannot work: raised at start-up, before anything is signed."""
