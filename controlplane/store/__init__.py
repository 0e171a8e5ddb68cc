"""The control plane's store: SQLAlchemy Core over SQLite (the embedded default) or PostgreSQL.

Registration entries with a global revision and an event log (for agents' entry watches),
attested agents, single-use join tokens, the trust bundle of every server's authorities, and
federation relationships with the bundles of other trust domains.
Schema migrations run with Alembic when the store opens. See ``store.py`` for the API and
``schema.py`` for the decisions behind the tables.
"""

from controlplane.store.engine import SQLITE_FILENAME, sqlite_url
from controlplane.store.errors import (
    EntryExistsError,
    EventsPrunedError,
    FederationExistsError,
    JoinTokenError,
    JoinTokenExpiredError,
    JoinTokenNotFoundError,
    NotFoundError,
    StoreError,
)
from controlplane.store.notify import RECHECK_INTERVAL, Change, ChangeFeed, ChangeListener
from controlplane.store.store import NOTIFY_CHANNEL, EntryEvent, Store, StoreVersion

__all__ = [
    "NOTIFY_CHANNEL",
    "RECHECK_INTERVAL",
    "SQLITE_FILENAME",
    "Change",
    "ChangeFeed",
    "ChangeListener",
    "EntryEvent",
    "EntryExistsError",
    "EventsPrunedError",
    "FederationExistsError",
    "JoinTokenError",
    "JoinTokenExpiredError",
    "JoinTokenNotFoundError",
    "NotFoundError",
    "Store",
    "StoreError",
    "StoreVersion",
    "sqlite_url",
]
