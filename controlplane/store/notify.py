"""Change notification: how a server learns that entries or the bundle changed, on any server.

- On PostgreSQL every write that changes entries, the bundle or federation sends
  ``NOTIFY spiffe_changes, 'entries:<revision>'`` (or ``'bundle:<sequence>'``,
  ``'federation:<revision>'``) inside its
  transaction; PostgreSQL delivers it on commit, to every listening session of every server.
  :class:`ChangeListener` holds one such session in a background thread (psycopg's
  ``notifies()``) and calls a callback for each change.
- Notifications can be missed (the listening connection drops; a server writes straight into the
  database), so :class:`ChangeFeed` also re-reads the store's version every
  :data:`RECHECK_INTERVAL` seconds (1 s). On SQLite, a single server's file, that re-check is the
  only mechanism; a server's own writes reach its watchers through the API layer directly.

:class:`ChangeFeed` is the small API the agent-facing service uses: ``wait(seen, timeout)`` blocks
until the store is past ``seen``; ``subscribe(callback)`` suits asyncio (the callback runs on a
feed thread, so pass it something like ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final, Literal, Self

import psycopg
from sqlalchemy.engine import URL

from controlplane.store.errors import StoreError
from controlplane.store.store import NOTIFY_CHANNEL, Store, StoreVersion

logger = logging.getLogger(__name__)

RECHECK_INTERVAL: Final = 1.0
_NOTIFIES_TIMEOUT: Final = 0.25
_CONNECT_TIMEOUT: Final = 10

ChangeKind = Literal["entries", "bundle", "federation", "resync"]
_KINDS: Final[tuple[ChangeKind, ...]] = ("entries", "bundle", "federation")


@dataclass(frozen=True, slots=True)
class Change:
    """Entries reached ``number`` (a revision), the bundle reached ``number`` (a sequence),
    federation reached ``number`` (a revision), or ``resync``: the listener reconnected and may have
    missed changes, so re-read the store."""

    kind: ChangeKind
    number: int

    @classmethod
    def parse(cls, payload: str) -> Change | None:
        """The change a notification payload names, or None for a payload this version does not know."""
        kind, _, number = payload.partition(":")
        for known in _KINDS:
            if kind == known and number.isdigit():
                return cls(known, int(number))
        return None


def _conninfo(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener:
    """``LISTEN spiffe_changes`` on PostgreSQL in a daemon thread, calling ``callback`` per change.

    The callback runs on the listener's thread and must not raise or block for long. After a lost
    connection the listener reconnects every ``reconnect_delay`` seconds and then reports a
    ``resync`` change, since notifications sent meanwhile are lost.
    """

    def __init__(self, url: URL, callback: Callable[[Change], None], *, reconnect_delay: float = 1.0) -> None:
        if url.get_backend_name() != "postgresql":
            raise StoreError("change listener needs PostgreSQL (SQLite has no LISTEN; poll instead)")
        self._url = url
        self._callback = callback
        self._reconnect_delay = reconnect_delay
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._failure: str | None = None
        self._thread: threading.Thread | None = None

    def start(self, *, timeout: float = _CONNECT_TIMEOUT) -> None:
        """Start listening; returns once ``LISTEN`` is in effect, or raises :class:`StoreError`."""
        if self._thread is not None:
            raise StoreError("change listener was already started")
        self._thread = threading.Thread(target=self._run, name="store-change-listener", daemon=True)
        self._thread.start()
        if not self._listening.wait(timeout) or self._failure is not None:
            failure = self._failure or "timed out"
            self.close()
            raise StoreError("change listener could not listen", failure)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def listening(self) -> bool:
        return self._listening.is_set() and not self._stop.is_set()

    def _run(self) -> None:
        connected_before = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(_conninfo(self._url), autocommit=True, connect_timeout=_CONNECT_TIMEOUT) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._listening.set()
                    if connected_before:
                        self._callback(Change("resync", 0))
                    connected_before = True
                    self._listen(conn)
            except psycopg.Error as err:
                detail = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
                if not connected_before:  # the first connection failed: start() reports it
                    self._failure = detail
                    self._listening.set()
                    return
                self._listening.clear()
                logger.warning("store: change listener lost its connection, reconnecting (%s)", detail)
                self._stop.wait(self._reconnect_delay)

    def _listen(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        while not self._stop.is_set():
            for notify in conn.notifies(timeout=_NOTIFIES_TIMEOUT):
                change = Change.parse(notify.payload)
                if change is not None:
                    self._callback(change)


class ChangeFeed:
    """The store's latest known :class:`StoreVersion`, kept current for waiters and subscribers.

    Fed by :class:`ChangeListener` on PostgreSQL (unless ``listen`` is False) and by a re-check
    of the store every ``recheck_interval`` seconds on both databases. No I/O until :meth:`start`.
    """

    def __init__(self, store: Store, *, recheck_interval: float = RECHECK_INTERVAL, listen: bool = True) -> None:
        self._store = store
        self._recheck_interval = recheck_interval
        self._listener = (
            ChangeListener(store.url, self._on_change) if listen and store.dialect == "postgresql" else None
        )
        self._condition = threading.Condition()
        self._version = StoreVersion(entry_revision=0, bundle_sequence=0)
        self._subscribers: list[Callable[[StoreVersion], None]] = []
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def start(self) -> None:
        """Read the store's version, start the re-check thread, and listen (PostgreSQL)."""
        self._advance(self._store.version())
        self._poller = threading.Thread(target=self._poll, name="store-change-recheck", daemon=True)
        self._poller.start()
        if self._listener is not None:
            try:
                self._listener.start()
            except StoreError:
                self.close()
                raise

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        if self._poller is not None:
            self._poller.join()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def version(self) -> StoreVersion:
        with self._condition:
            return self._version

    def wait(self, seen: StoreVersion, timeout: float) -> StoreVersion:
        """Block until the store is past ``seen`` (in any counter) or ``timeout`` seconds pass; the version then."""
        with self._condition:
            self._condition.wait_for(lambda: _newer(self._version, seen), timeout)
            return self._version

    def subscribe(self, callback: Callable[[StoreVersion], None]) -> Callable[[], None]:
        """Call ``callback`` (on a feed thread) with every newer version; returns the unsubscribe function."""
        with self._condition:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._condition:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def _on_change(self, change: Change) -> None:
        current = self.version
        if change.kind == "entries":
            self._advance(replace(current, entry_revision=change.number))
        elif change.kind == "bundle":
            self._advance(replace(current, bundle_sequence=change.number))
        elif change.kind == "federation":
            self._advance(replace(current, federation_revision=change.number))
        else:
            self._recheck()

    def _poll(self) -> None:
        while not self._stop.wait(self._recheck_interval):
            self._recheck()

    def _recheck(self) -> None:
        try:
            self._advance(self._store.version())
        except StoreError as err:
            logger.warning("store: could not re-check for changes (%s)", err)

    def _advance(self, version: StoreVersion) -> None:
        with self._condition:
            merged = StoreVersion(
                entry_revision=max(self._version.entry_revision, version.entry_revision),
                bundle_sequence=max(self._version.bundle_sequence, version.bundle_sequence),
                federation_revision=max(self._version.federation_revision, version.federation_revision),
            )
            if merged == self._version:
                return
            self._version = merged
            subscribers = list(self._subscribers)
            self._condition.notify_all()
        for callback in subscribers:
            callback(merged)


def _newer(version: StoreVersion, seen: StoreVersion) -> bool:
    return (
        version.entry_revision > seen.entry_revision
        or version.bundle_sequence > seen.bundle_sequence
        or version.federation_revision > seen.federation_revision
    )
