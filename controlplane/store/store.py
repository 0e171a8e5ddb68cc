"""The control plane's store: registration entries with revisions and events, agents, join tokens, the bundle.

:class:`Store` is synchronous and thread-safe: one SQLAlchemy engine, a pooled connection per
call, one transaction per method. The API layer calls it from asyncio through a thread.

Every write of entries takes the ``entry_revision`` counter row first and holds its lock until it
commits, so revisions are committed in order (see ``schema.py``). On PostgreSQL a write that
changes entries or the bundle also sends ``NOTIFY spiffe_changes`` inside its transaction, which
PostgreSQL delivers on commit only; :mod:`controlplane.store.notify` listens for it.

Reads run in one snapshot: ``REPEATABLE READ`` on PostgreSQL (a read-only transaction there never
fails to serialize), a deferred ``BEGIN`` on SQLite in WAL mode.

How an agent's entry watch uses it: take pages with :meth:`Store.snapshot_page` and keep the
revision of the *first* page, R; when the pages are done, apply :meth:`Store.events_since` (R) and
onward. Events are idempotent to apply (each carries the entry as it is now), so an entry that
changed while the pages were read is simply seen twice.

Federation: relationships with other trust domains and the bundle last fetched for each. Every
change agents could see bumps the ``federation_revision`` counter (and sends ``federation:<n>``);
writers take that counter's lock first, so when several servers fetch the same foreign bundle, one
stores it and the others find it already there (:meth:`Store.store_federated_bundle`).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal, Self

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key
from sqlalchemy import ColumnElement, Connection, Engine, delete, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError

from controlplane.federation.relationship import FederationRelationship, FederationStatus, StoreOutcome
from controlplane.model import AttestedAgent, JoinToken, RegistrationEntry, Selector
from controlplane.store import codec
from controlplane.store import migrate as migrations
from controlplane.store.engine import WRITE_OPTION, create_store_engine, parse_url
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
from controlplane.store.schema import (
    BUNDLE_SEQUENCE,
    ENTRY_REVISION,
    EVENTS_PRUNED_BEFORE,
    FEDERATION_REVISION,
    attested_agents,
    counters,
    entry_events,
    entry_selectors,
    federated_bundles,
    federation_relationships,
    join_tokens,
    jwt_authorities,
    registration_entries,
    x509_authorities,
)
from spiffecore import JWTPublicKey, SpiffeBundle, SpiffeError, SpiffeID, TrustDomain

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL: Final = "spiffe_changes"
MAX_EVENTS_PER_CALL: Final = 10_000

EventKind = Literal["create", "update", "delete"]
ChangeKind = Literal["entries", "bundle", "federation"]

_E = registration_entries
_S = entry_selectors


@dataclass(frozen=True, slots=True, kw_only=True)
class EntryEvent:
    """Entry ``entry_id`` was created, updated or deleted at ``revision``.

    ``entry`` is the entry as it is *now* (None once it no longer exists), so applying events in
    order, each as an upsert or a removal, always converges on the store's state.
    """

    revision: int
    entry_id: str
    kind: EventKind
    entry: RegistrationEntry | None


_MIGRATION_ATTEMPTS: Final = 20


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class StoreVersion:
    """Where the store's entries and bundles are: the last entry revision, the bundle sequence and
    the federation revision (relationships and foreign bundles)."""

    entry_revision: int
    bundle_sequence: int
    federation_revision: int = 0


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _database_error(operation: str, err: SQLAlchemyError) -> StoreError:
    """A StoreError with the driver's first line only: SQLAlchemy's text carries SQL and parameters."""
    if isinstance(err, DBAPIError) and err.orig is not None:
        detail = str(err.orig).strip().splitlines()[0] if str(err.orig).strip() else type(err.orig).__name__
        cause = f"{type(err.orig).__name__}: {detail}"
    else:
        cause = type(err).__name__
    return StoreError(f"could not {operation}: database error", cause)


class Store:
    """The control plane's persistent state on SQLite or PostgreSQL. Open with :meth:`open`."""

    def __init__(self, engine: Engine, url: URL) -> None:
        self._engine = engine
        self._url = url
        self._postgres = engine.dialect.name == "postgresql"
        self._read_engine = engine.execution_options(isolation_level="REPEATABLE READ") if self._postgres else engine

    @classmethod
    def open(cls, url: str | URL, *, migrate: bool = True) -> Store:
        """Connect to ``url`` (``sqlite:///<file>`` or ``postgresql+psycopg://...``) and check the schema.

        With ``migrate`` the schema is brought to the newest revision first (safe with several
        servers starting at once); without it, a database not at the newest revision is an error.
        """
        parsed = parse_url(url)
        engine = create_store_engine(parsed)
        store = cls(engine, parsed)
        try:
            store._check_schema(migrate=migrate)
        except BaseException:
            engine.dispose()
            raise
        return store

    def _check_schema(self, *, migrate: bool) -> None:
        for attempt in range(_MIGRATION_ATTEMPTS):
            try:
                if migrate:
                    migrations.upgrade(self._engine)
                found = migrations.current_revision(self._engine)
                break
            except OperationalError as err:
                # SQLite answers some lock conflicts at once instead of waiting out the busy timeout
                # (a fresh file switching to WAL while another server does; a read upgrading to a
                # write). Migrations are idempotent, so servers starting together just try again.
                locked = self.dialect == "sqlite" and "database is locked" in str(err)
                if not locked or attempt + 1 == _MIGRATION_ATTEMPTS:
                    raise _database_error("migrate the database schema", err) from err
                time.sleep(0.05 * (attempt + 1))
            except SQLAlchemyError as err:
                raise _database_error("migrate the database schema", err) from err
        wanted = migrations.head_revision()
        if found != wanted:
            raise StoreError(f"database schema is at revision {found}, this server needs {wanted}; migrate it")

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._engine.dialect.name

    @property
    def url(self) -> URL:
        """The database URL (render it with ``hide_password=True`` before showing it)."""
        return self._url

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def _read(self, operation: str) -> Iterator[Connection]:
        try:
            with self._read_engine.connect() as connection, connection.begin():
                yield connection
        except SQLAlchemyError as err:
            raise _database_error(operation, err) from err

    @contextmanager
    def _write(self, operation: str, *, on_conflict: Callable[[], StoreError] | None = None) -> Iterator[Connection]:
        try:
            with self._engine.connect() as connection:
                connection.execution_options(**{WRITE_OPTION: True})
                with connection.begin():
                    yield connection
        except IntegrityError as err:
            if on_conflict is None:
                raise _database_error(operation, err) from err
            raise on_conflict() from err
        except SQLAlchemyError as err:
            raise _database_error(operation, err) from err

    def _notify(self, connection: Connection, kind: ChangeKind, number: int) -> None:
        """Queue ``NOTIFY spiffe_changes, '<kind>:<number>'``; PostgreSQL sends it if and when we commit."""
        if self._postgres:
            connection.execute(
                text("SELECT pg_notify(:channel, :payload)"), {"channel": NOTIFY_CHANNEL, "payload": f"{kind}:{number}"}
            )

    @staticmethod
    def _bump(connection: Connection, name: str, by: int = 1) -> int:
        """Add ``by`` to a counter and return its new value; the row stays locked until commit."""
        statement = (
            update(counters)
            .where(counters.c.name == name)
            .values(value=counters.c.value + by)
            .returning(counters.c.value)
        )
        return int(connection.execute(statement).scalar_one())

    @staticmethod
    def _counter(connection: Connection, name: str, *, lock: bool = False) -> int:
        statement = select(counters.c.value).where(counters.c.name == name)
        if lock:
            statement = statement.with_for_update()  # SQLite: BEGIN IMMEDIATE already serializes writers
        return int(connection.execute(statement).scalar_one())

    # -- registration entries -------------------------------------------------------------------

    def create_entry(self, entry: RegistrationEntry) -> RegistrationEntry:
        """Store a new entry; returns it with ``id`` (a new UUID unless given), ``revision`` and ``created_at``.

        Raises :class:`EntryExistsError` if an entry with the same parent ID, SPIFFE ID and
        selectors, or the same ID, exists.
        """

        def conflict() -> StoreError:
            return EntryExistsError("similar entry already exists", str(entry.spiffe_id))

        return self._create_entries([entry], conflict)[0]

    def create_entries(self, entries: Sequence[RegistrationEntry]) -> list[RegistrationEntry]:
        """Store several new entries in one transaction: all of them, or none if one is a duplicate."""

        def conflict() -> StoreError:
            return EntryExistsError("an entry of the batch already exists, or two entries of the batch are similar")

        return self._create_entries(entries, conflict) if entries else []

    def _create_entries(
        self, entries: Sequence[RegistrationEntry], conflict: Callable[[], StoreError]
    ) -> list[RegistrationEntry]:
        with self._write("create entries", on_conflict=conflict) as connection:
            last = self._bump(connection, ENTRY_REVISION, len(entries))
            first = last - len(entries) + 1
            now = _utcnow()
            stored = [
                replace(entry, id=entry.id or str(uuid.uuid4()), revision=first + index, created_at=now)
                for index, entry in enumerate(entries)
            ]
            connection.execute(insert(_E), [codec.entry_row(entry) for entry in stored])
            connection.execute(insert(_S), [row for entry in stored for row in codec.selector_rows(entry)])
            connection.execute(
                insert(entry_events),
                [{"revision": e.revision, "entry_id": e.id, "kind": "create"} for e in stored],
            )
            self._notify(connection, "entries", last)
        return stored

    def update_entry(self, entry: RegistrationEntry) -> RegistrationEntry:
        """Replace the entry with ``entry.id``; returns it with its new revision (``created_at`` kept).

        Raises :class:`NotFoundError` for an unknown ID and :class:`EntryExistsError` if the
        change would make it similar to another entry.
        """

        def conflict() -> StoreError:
            return EntryExistsError("similar entry already exists", str(entry.spiffe_id))

        with self._write("update entry", on_conflict=conflict) as connection:
            revision = self._bump(connection, ENTRY_REVISION)
            created_at = connection.execute(select(_E.c.created_at).where(_E.c.id == entry.id)).scalar_one_or_none()
            if created_at is None:
                raise NotFoundError("no entry with this ID", entry.id)
            stored = replace(entry, revision=revision, created_at=created_at)
            row = codec.entry_row(stored)
            del row["id"]
            connection.execute(update(_E).where(_E.c.id == entry.id).values(**row))
            connection.execute(delete(_S).where(_S.c.entry_id == entry.id))
            connection.execute(insert(_S), codec.selector_rows(stored))
            connection.execute(insert(entry_events).values(revision=revision, entry_id=entry.id, kind="update"))
            self._notify(connection, "entries", revision)
        return stored

    def delete_entry(self, entry_id: str) -> RegistrationEntry:
        """Delete an entry; returns it as it was. Raises :class:`NotFoundError` for an unknown ID."""
        with self._write("delete entry") as connection:
            revision = self._bump(connection, ENTRY_REVISION)
            found = self._select_entries(connection, [_E.c.id == entry_id])
            if not found:
                raise NotFoundError("no entry with this ID", entry_id)
            connection.execute(delete(_S).where(_S.c.entry_id == entry_id))
            connection.execute(delete(_E).where(_E.c.id == entry_id))
            connection.execute(insert(entry_events).values(revision=revision, entry_id=entry_id, kind="delete"))
            self._notify(connection, "entries", revision)
        return found[0]

    def get_entry(self, entry_id: str) -> RegistrationEntry:
        """The entry with ``entry_id``, or :class:`NotFoundError`."""
        with self._read("get entry") as connection:
            found = self._select_entries(connection, [_E.c.id == entry_id])
        if not found:
            raise NotFoundError("no entry with this ID", entry_id)
        return found[0]

    def list_entries(
        self,
        *,
        spiffe_id: SpiffeID | None = None,
        parent_id: SpiffeID | None = None,
        selector: Selector | None = None,
        after_id: str = "",
        limit: int | None = None,
    ) -> list[RegistrationEntry]:
        """Entries matching every filter given (``selector``: entries that have it), ordered by ID.

        Page with ``after_id`` (the last ID of the previous page) and ``limit``.
        """
        conditions: list[ColumnElement[bool]] = []
        if spiffe_id is not None:
            conditions.append(_E.c.spiffe_id == str(spiffe_id))
        if parent_id is not None:
            conditions.append(_E.c.parent_id == str(parent_id))
        if selector is not None:
            digest = codec.selector_digest(selector)
            conditions.append(_E.c.id.in_(select(_S.c.entry_id).where(_S.c.digest == digest)))
        filtered = bool(conditions)
        if after_id:
            conditions.append(_E.c.id > after_id)
        with self._read("list entries") as connection:
            return self._select_entries(connection, conditions, limit=limit, contiguous=not filtered)

    def count_entries(self) -> int:
        with self._read("count entries") as connection:
            return int(connection.execute(select(func.count()).select_from(_E)).scalar_one())

    def snapshot_page(self, after_id: str, limit: int) -> tuple[list[RegistrationEntry], int]:
        """Up to ``limit`` entries with IDs after ``after_id``, and the revision they are consistent with."""
        if limit < 1:
            raise StoreError("snapshot page limit must be at least 1", limit)
        with self._read("read entry snapshot") as connection:
            revision = self._counter(connection, ENTRY_REVISION)
            conditions = [_E.c.id > after_id] if after_id else []
            entries = self._select_entries(connection, conditions, limit=limit, contiguous=True)
        return entries, revision

    def current_revision(self) -> int:
        """The revision of the last committed entry change (0 for a new store)."""
        with self._read("read entry revision") as connection:
            return self._counter(connection, ENTRY_REVISION)

    def events_since(self, revision: int, limit: int = 1000) -> list[EntryEvent]:
        """Entry events after ``revision``, oldest first, at most ``limit`` (capped at 10,000).

        Raises :class:`EventsPrunedError` if some of them were pruned: take a new snapshot.
        """
        limit = max(1, min(limit, MAX_EVENTS_PER_CALL))
        with self._read("read entry events") as connection:
            pruned_before = self._counter(connection, EVENTS_PRUNED_BEFORE)
            if revision + 1 < pruned_before:
                raise EventsPrunedError(
                    f"entry events after revision {revision} are gone (pruned before {pruned_before}): "
                    "take a new snapshot"
                )
            rows = connection.execute(
                select(entry_events)
                .where(entry_events.c.revision > revision)
                .order_by(entry_events.c.revision)
                .limit(limit)
            ).all()
            ids = sorted({row.entry_id for row in rows})
            entries = {e.id: e for e in self._select_entries(connection, [_E.c.id.in_(ids)])} if ids else {}
        return [
            EntryEvent(revision=row.revision, entry_id=row.entry_id, kind=row.kind, entry=entries.get(row.entry_id))
            for row in rows
        ]

    def prune_events(self, before_revision: int) -> int:
        """Delete entry events older than ``before_revision``; returns how many were deleted."""
        with self._write("prune entry events") as connection:
            current = self._counter(connection, ENTRY_REVISION, lock=True)
            before_revision = min(before_revision, current + 1)
            deleted = connection.execute(delete(entry_events).where(entry_events.c.revision < before_revision))
            connection.execute(
                update(counters)
                .where(counters.c.name == EVENTS_PRUNED_BEFORE, counters.c.value < before_revision)
                .values(value=before_revision)
            )
        return deleted.rowcount

    @staticmethod
    def _select_entries(
        connection: Connection,
        conditions: Sequence[ColumnElement[bool]],
        *,
        limit: int | None = None,
        contiguous: bool = False,
    ) -> list[RegistrationEntry]:
        """Entries matching ``conditions`` ordered by ID, each with its selectors (two queries, one snapshot).

        ``contiguous``: the entries are every entry between the first ID and the last, so their
        selectors are read by a range scan of the primary key rather than an IN list.
        """
        query = select(_E).where(*conditions).order_by(_E.c.id)
        if limit is not None:
            query = query.limit(limit)
        rows = connection.execute(query).all()
        if not rows:
            return []
        selector_query = select(_S.c.entry_id, _S.c.type, _S.c.value)
        if not contiguous and len(rows) <= 1000:
            selector_query = selector_query.where(_S.c.entry_id.in_([row.id for row in rows]))
        else:  # a range scan of the primary key (for a sparse match, it reads some selectors in vain)
            selector_query = selector_query.where(_S.c.entry_id >= rows[0].id, _S.c.entry_id <= rows[-1].id)
        selectors: dict[str, list[Selector]] = {}
        for entry_id, kind, value in connection.execute(selector_query):
            selectors.setdefault(entry_id, []).append(codec.make_selector(kind, value))
        return codec.entries_from_rows(rows, selectors)

    # -- attested agents ------------------------------------------------------------------------

    def upsert_agent(self, agent: AttestedAgent) -> None:
        """Store an attested agent, replacing what was stored under its SPIFFE ID."""
        row = codec.agent_row(agent)
        dialect_insert = postgresql.insert if self._postgres else sqlite.insert
        statement = dialect_insert(attested_agents).values(**row)
        statement = statement.on_conflict_do_update(
            index_elements=[attested_agents.c.spiffe_id],
            set_={name: statement.excluded[name] for name in row if name != "spiffe_id"},
        )
        with self._write("store agent") as connection:
            connection.execute(statement)

    def get_agent(self, spiffe_id: SpiffeID) -> AttestedAgent:
        """The agent with ``spiffe_id``, or :class:`NotFoundError`."""
        with self._read("get agent") as connection:
            row = connection.execute(
                select(attested_agents).where(attested_agents.c.spiffe_id == str(spiffe_id))
            ).first()
        if row is None:
            raise NotFoundError("no agent with this ID", str(spiffe_id))
        return codec.agent_from_row(row)

    def list_agents(self) -> list[AttestedAgent]:
        """All agents, ordered by SPIFFE ID."""
        with self._read("list agents") as connection:
            rows = connection.execute(select(attested_agents).order_by(attested_agents.c.spiffe_id)).all()
        return [codec.agent_from_row(row) for row in rows]

    def set_agent_serial(self, spiffe_id: SpiffeID, serial: str, expires_at: datetime) -> AttestedAgent:
        """Record the serial and expiry of the agent SVID just issued to ``spiffe_id``; returns the agent."""
        return self._update_agent("set agent serial", spiffe_id, serial=serial, expires_at=expires_at)

    def ban_agent(self, spiffe_id: SpiffeID) -> AttestedAgent:
        """Ban an agent: it can neither renew nor re-attest. Its serial is cleared, as SPIRE does.

        Returns the banned agent.
        """
        return self._update_agent("ban agent", spiffe_id, banned=True, serial="")

    def evict_agent(self, spiffe_id: SpiffeID) -> AttestedAgent:
        """Delete an agent, which may then attest again (a ban, by contrast, stays); returns it as it was."""
        with self._write("evict agent") as connection:
            row = connection.execute(
                delete(attested_agents)
                .where(attested_agents.c.spiffe_id == str(spiffe_id))
                .returning(*attested_agents.c)
            ).first()
        if row is None:
            raise NotFoundError("no agent with this ID", str(spiffe_id))
        return codec.agent_from_row(row)

    def _update_agent(self, operation: str, spiffe_id: SpiffeID, **values: Any) -> AttestedAgent:
        with self._write(operation) as connection:
            row = connection.execute(
                update(attested_agents)
                .where(attested_agents.c.spiffe_id == str(spiffe_id))
                .values(**values)
                .returning(*attested_agents.c)
            ).first()
        if row is None:
            raise NotFoundError("no agent with this ID", str(spiffe_id))
        return codec.agent_from_row(row)

    # -- join tokens ----------------------------------------------------------------------------

    def create_join_token(self, token: JoinToken) -> None:
        """Store a join token (as a digest: the token itself is never stored)."""

        def conflict() -> StoreError:
            return JoinTokenError("join token already exists")

        alias = None if token.alias is None else str(token.alias)
        with self._write("create join token", on_conflict=conflict) as connection:
            connection.execute(
                insert(join_tokens).values(digest=_token_digest(token.token), expires_at=token.expires_at, alias=alias)
            )

    def consume_join_token(self, token: str, now: datetime) -> JoinToken:
        """Use a join token up: exactly one caller ever gets it, even with several servers racing.

        Raises :class:`JoinTokenNotFoundError` for a token unknown or already used, and
        :class:`JoinTokenExpiredError` for an expired one (which is deleted all the same).
        """
        with self._write("consume join token") as connection:
            row = connection.execute(
                delete(join_tokens)
                .where(join_tokens.c.digest == _token_digest(token))
                .returning(join_tokens.c.expires_at, join_tokens.c.alias)
            ).first()
        if row is None:
            raise JoinTokenNotFoundError("join token is unknown or was already used")
        if row.expires_at <= now:
            raise JoinTokenExpiredError("join token has expired")
        alias = None if row.alias is None else codec.parse_id(row.alias)
        return JoinToken(token=token, expires_at=row.expires_at, alias=alias)

    def remove_expired_join_tokens(self, before: datetime) -> int:
        """Delete join tokens that expired before ``before``; returns how many."""
        with self._write("remove expired join tokens") as connection:
            return connection.execute(delete(join_tokens).where(join_tokens.c.expires_at < before)).rowcount

    # -- bundle ---------------------------------------------------------------------------------

    def add_x509_authority(self, server_id: str, certificate: x509.Certificate) -> bool:
        """Add a server's X.509 root to the bundle; False (and no new sequence) if it is already there."""
        der = certificate.public_bytes(Encoding.DER)
        fingerprint = hashlib.sha256(der).digest()
        with self._write("add X.509 authority") as connection:
            self._counter(connection, BUNDLE_SEQUENCE, lock=True)
            exists = connection.execute(
                select(x509_authorities.c.fingerprint).where(x509_authorities.c.fingerprint == fingerprint)
            ).first()
            if exists is not None:
                return False
            connection.execute(
                insert(x509_authorities).values(
                    fingerprint=fingerprint, server_id=server_id, der=der, not_after=certificate.not_valid_after_utc
                )
            )
            self._notify(connection, "bundle", self._bump(connection, BUNDLE_SEQUENCE))
        return True

    def add_jwt_authority(self, server_id: str, kid: str, public_key: JWTPublicKey, not_after: datetime) -> bool:
        """Add a server's JWT signing key; False if this key is already there under ``kid``.

        Raises :class:`StoreError` if ``kid`` already names a different key.
        """
        der = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        with self._write("add JWT authority") as connection:
            self._counter(connection, BUNDLE_SEQUENCE, lock=True)
            existing = connection.execute(
                select(jwt_authorities.c.public_key).where(jwt_authorities.c.kid == kid)
            ).scalar_one_or_none()
            if existing is not None:
                if bytes(existing) != der:
                    raise StoreError("JWT authority key ID already names a different key", kid)
                return False
            connection.execute(
                insert(jwt_authorities).values(kid=kid, server_id=server_id, public_key=der, not_after=not_after)
            )
            self._notify(connection, "bundle", self._bump(connection, BUNDLE_SEQUENCE))
        return True

    def remove_expired_authorities(self, before: datetime) -> int:
        """Remove X.509 and JWT authorities that expired before ``before``; returns how many."""
        with self._write("remove expired authorities") as connection:
            self._counter(connection, BUNDLE_SEQUENCE, lock=True)
            removed = connection.execute(delete(x509_authorities).where(x509_authorities.c.not_after < before)).rowcount
            removed += connection.execute(delete(jwt_authorities).where(jwt_authorities.c.not_after < before)).rowcount
            if removed:
                self._notify(connection, "bundle", self._bump(connection, BUNDLE_SEQUENCE))
        return removed

    def get_bundle(self, trust_domain: TrustDomain) -> SpiffeBundle:
        """The trust domain's bundle: every server's roots and JWT keys, with the bundle sequence."""
        with self._read("get bundle") as connection:
            sequence = self._counter(connection, BUNDLE_SEQUENCE)
            ders = connection.execute(
                select(x509_authorities.c.der).order_by(x509_authorities.c.not_after, x509_authorities.c.fingerprint)
            ).scalars()
            roots = [x509.load_der_x509_certificate(bytes(der)) for der in ders]
            keys = connection.execute(
                select(jwt_authorities.c.kid, jwt_authorities.c.public_key).order_by(
                    jwt_authorities.c.not_after, jwt_authorities.c.kid
                )
            ).all()
        jwt_keys: dict[str, JWTPublicKey] = {}
        for kid, der in keys:
            key = load_der_public_key(bytes(der))
            if not isinstance(key, JWTPublicKey):
                raise StoreError("stored JWT authority is not an EC or RSA public key", kid)
            jwt_keys[kid] = key
        return SpiffeBundle.create(trust_domain, x509_authorities=roots, jwt_authorities=jwt_keys, sequence=sequence)

    def bundle_sequence(self) -> int:
        """The bundle's sequence number: 0 for a new store, then one more for every change."""
        with self._read("read bundle sequence") as connection:
            return self._counter(connection, BUNDLE_SEQUENCE)

    def version(self) -> StoreVersion:
        """The entry revision, the bundle sequence and the federation revision, read together."""
        with self._read("read store version") as connection:
            statement = select(counters.c.name, counters.c.value).where(
                counters.c.name.in_([ENTRY_REVISION, BUNDLE_SEQUENCE, FEDERATION_REVISION])
            )
            rows = dict(connection.execute(statement).all())
        return StoreVersion(
            entry_revision=int(rows[ENTRY_REVISION]),
            bundle_sequence=int(rows[BUNDLE_SEQUENCE]),
            federation_revision=int(rows[FEDERATION_REVISION]),
        )

    # -- federation -----------------------------------------------------------------------------

    def create_federation_relationship(
        self, relationship: FederationRelationship, bundle: SpiffeBundle | None = None, *, at: datetime | None = None
    ) -> FederationStatus:
        """Store a new relationship, with the foreign domain's bundle if given (https_spiffe's bootstrap).

        Raises :class:`FederationExistsError` if a relationship with that trust domain exists.
        """
        td = relationship.trust_domain
        if bundle is not None and bundle.trust_domain != td:
            raise StoreError(f"bundle of {bundle.trust_domain} given for the relationship with", td.name)

        def conflict() -> StoreError:
            return FederationExistsError("a federation relationship with this trust domain already exists", td.name)

        now = at or _utcnow()
        stored = replace(relationship, created_at=now)
        with self._write("create federation relationship", on_conflict=conflict) as connection:
            self._counter(connection, FEDERATION_REVISION, lock=True)
            connection.execute(
                insert(federation_relationships).values(**codec.relationship_row(stored), created_at=now, last_error="")
            )
            if bundle is not None:
                connection.execute(
                    insert(federated_bundles).values(trust_domain=td.name, document=bundle.to_json(), updated_at=now)
                )
            self._notify(connection, "federation", self._bump(connection, FEDERATION_REVISION))
        return FederationStatus(relationship=stored, bundle=bundle)

    def list_federation_relationships(self) -> list[FederationStatus]:
        """Every relationship with its bundle and fetch state, ordered by trust domain."""
        with self._read("list federation relationships") as connection:
            return self._select_federation(connection, None)

    def get_federation_relationship(self, trust_domain: TrustDomain) -> FederationStatus:
        """The relationship with ``trust_domain``, or :class:`NotFoundError`."""
        with self._read("get federation relationship") as connection:
            found = self._select_federation(connection, trust_domain)
        if not found:
            raise NotFoundError("no federation relationship with this trust domain", trust_domain.name)
        return found[0]

    def delete_federation_relationship(self, trust_domain: TrustDomain) -> FederationStatus:
        """Delete a relationship and its bundle; returns them as they were (:class:`NotFoundError` if none)."""
        with self._write("delete federation relationship") as connection:
            self._counter(connection, FEDERATION_REVISION, lock=True)
            found = self._select_federation(connection, trust_domain)
            if not found:
                raise NotFoundError("no federation relationship with this trust domain", trust_domain.name)
            connection.execute(delete(federated_bundles).where(federated_bundles.c.trust_domain == trust_domain.name))
            connection.execute(
                delete(federation_relationships).where(federation_relationships.c.trust_domain == trust_domain.name)
            )
            self._notify(connection, "federation", self._bump(connection, FEDERATION_REVISION))
        return found[0]

    def store_federated_bundle(
        self, trust_domain: TrustDomain, bundle: SpiffeBundle, *, at: datetime, force: bool = False
    ) -> StoreOutcome:
        """Keep a bundle just fetched for ``trust_domain``, and record the successful fetch.

        Idempotent, and safe with several servers fetching at once: the same bundle is stored once
        (:attr:`StoreOutcome.UNCHANGED` for the later ones), and a bundle whose sequence number is
        below the stored one's is an older answer that lost a race (:attr:`StoreOutcome.STALE`),
        unless ``force`` (an operator's refresh, say after the foreign domain started afresh).
        Nothing is stored for a relationship deleted meanwhile (:attr:`StoreOutcome.GONE`).
        """
        if bundle.trust_domain != trust_domain:
            raise StoreError(f"bundle of {bundle.trust_domain} given for the relationship with", trust_domain.name)
        document = bundle.to_json()
        name = trust_domain.name
        with self._write("store federated bundle") as connection:
            self._counter(connection, FEDERATION_REVISION, lock=True)
            exists = connection.execute(
                select(federation_relationships.c.trust_domain).where(federation_relationships.c.trust_domain == name)
            ).first()
            if exists is None:
                return StoreOutcome.GONE
            stored = connection.execute(
                select(federated_bundles.c.document).where(federated_bundles.c.trust_domain == name)
            ).scalar_one_or_none()
            outcome = StoreOutcome.STORED
            if stored is not None:
                if bytes(stored) == document:
                    outcome = StoreOutcome.UNCHANGED
                elif not force:
                    previous = _parse_federated(trust_domain, bytes(stored)).sequence
                    if previous is not None and bundle.sequence is not None and bundle.sequence < previous:
                        outcome = StoreOutcome.STALE
            connection.execute(
                update(federation_relationships)
                .where(federation_relationships.c.trust_domain == name)
                .values(refreshed_at=at, last_attempt_at=at, last_error="")
            )
            if outcome is StoreOutcome.STORED:
                if stored is None:
                    connection.execute(
                        insert(federated_bundles).values(trust_domain=name, document=document, updated_at=at)
                    )
                else:
                    connection.execute(
                        update(federated_bundles)
                        .where(federated_bundles.c.trust_domain == name)
                        .values(document=document, updated_at=at)
                    )
                self._notify(connection, "federation", self._bump(connection, FEDERATION_REVISION))
        return outcome

    def record_federation_failure(self, trust_domain: TrustDomain, error: str, *, at: datetime) -> bool:
        """Record a failed fetch (the stored bundle stays); False if the relationship is gone."""
        with self._write("record federation failure") as connection:
            updated = connection.execute(
                update(federation_relationships)
                .where(federation_relationships.c.trust_domain == trust_domain.name)
                .values(last_attempt_at=at, last_error=error)
            ).rowcount
        return bool(updated)

    def federated_bundles(self) -> dict[TrustDomain, SpiffeBundle]:
        """The stored bundle of every federated trust domain that has one."""
        with self._read("read federated bundles") as connection:
            rows = connection.execute(
                select(federated_bundles.c.trust_domain, federated_bundles.c.document).order_by(
                    federated_bundles.c.trust_domain
                )
            ).all()
        bundles: dict[TrustDomain, SpiffeBundle] = {}
        for name, document in rows:
            trust_domain = codec.parse_trust_domain(name)
            bundles[trust_domain] = _parse_federated(trust_domain, bytes(document))
        return bundles

    def federation_revision(self) -> int:
        """0 for a new store, then one more for every change of relationships or foreign bundles."""
        with self._read("read federation revision") as connection:
            return self._counter(connection, FEDERATION_REVISION)

    @staticmethod
    def _select_federation(connection: Connection, trust_domain: TrustDomain | None) -> list[FederationStatus]:
        query = (
            select(federation_relationships, federated_bundles.c.document)
            .outerjoin(federated_bundles, federated_bundles.c.trust_domain == federation_relationships.c.trust_domain)
            .order_by(federation_relationships.c.trust_domain)
        )
        if trust_domain is not None:
            query = query.where(federation_relationships.c.trust_domain == trust_domain.name)
        found: list[FederationStatus] = []
        for row in connection.execute(query).all():
            relationship = codec.relationship_from_row(row)
            bundle = None if row.document is None else _parse_federated(relationship.trust_domain, bytes(row.document))
            found.append(
                FederationStatus(
                    relationship=relationship,
                    bundle=bundle,
                    refreshed_at=row.refreshed_at,
                    last_attempt_at=row.last_attempt_at,
                    last_error=row.last_error,
                )
            )
        return found


def _parse_federated(trust_domain: TrustDomain, document: bytes) -> SpiffeBundle:
    try:
        return SpiffeBundle.parse(trust_domain, document)
    except SpiffeError as err:
        raise StoreError(
            f"stored bundle of a federated trust domain does not parse ({err})", trust_domain.name
        ) from err
