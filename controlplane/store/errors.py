"""The store's errors: one root, :class:`StoreError`, under ``spiffecore.SpiffeError``.

Database failures surface as :class:`StoreError` naming the operation and the driver's message
(never SQLAlchemy's rendering, which carries statements and parameters). Join tokens are secrets:
no message ever quotes one.
"""

from __future__ import annotations

from spiffecore import SpiffeError


class StoreError(SpiffeError):
    """The store could not do what was asked: the database failed, or a rule of the store was broken."""

    layer = "store"


class EntryExistsError(StoreError):
    """An entry with the same parent ID, SPIFFE ID and selectors (or the same entry ID) already exists."""


class NotFoundError(StoreError, LookupError):
    """No entry, agent or federation relationship with the given ID or trust domain."""


class FederationExistsError(StoreError):
    """A federation relationship with this trust domain already exists."""


class EventsPrunedError(StoreError):
    """Entry events after the asked-for revision were pruned: the reader must take a new snapshot."""


class JoinTokenError(StoreError):
    """A join token cannot be used. The message never contains the token."""


class JoinTokenNotFoundError(JoinTokenError):
    """The join token is unknown, or was already used (the two are indistinguishable by design)."""


class JoinTokenExpiredError(JoinTokenError):
    """The join token existed but had expired; it has been deleted."""
