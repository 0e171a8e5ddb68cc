"""Engines for the store's two databases: SQLite in the data directory, or PostgreSQL via psycopg.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk when it returns),
``foreign_keys=ON`` and a busy timeout, set on every new connection. pysqlite's own transaction
handling is switched off so the store controls ``BEGIN``: readers use a plain (deferred)
``BEGIN``, whose first read fixes a snapshot for the whole transaction; writers use
``BEGIN IMMEDIATE``, which takes the write lock up front, so two writers queue on the busy timeout
instead of failing when a reader upgrades to a writer.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import ConnectionPoolEntry

from controlplane.store.errors import StoreError

SQLITE_FILENAME: Final = "datastore.sqlite3"
SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
# Execution option asking for ``BEGIN IMMEDIATE`` on SQLite (ignored on PostgreSQL).
WRITE_OPTION: Final = "spiffe_store_write"
_DRIVERS: Final = {"sqlite": "sqlite", "sqlite+pysqlite": "sqlite", "postgresql+psycopg": "postgresql"}


def sqlite_url(data_dir: Path) -> str:
    """The URL of the embedded default store, ``<data_dir>/datastore.sqlite3``."""
    return URL.create("sqlite", database=str(data_dir / SQLITE_FILENAME)).render_as_string()


def parse_url(url: str | URL) -> URL:
    """Parse and check a store URL: ``sqlite:///<file>`` or ``postgresql+psycopg://...``."""
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise StoreError("database URL could not be parsed (it is not quoted, as it may hold a password)") from err
    shown = parsed.render_as_string(hide_password=True)
    if parsed.drivername not in _DRIVERS:
        raise StoreError("database URL must be sqlite:///<file> or postgresql+psycopg://...", shown)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise StoreError("SQLite store must be a file (an in-memory database is not shared by connections)", shown)
    return parsed


def create_store_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_engine(url: URL) -> Engine:
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        pool_size=8,
        max_overflow=16,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None  # the store emits BEGIN itself (see _on_begin)
        cursor = dbapi_connection.cursor()
        try:
            for pragma in (
                "journal_mode=WAL",
                "synchronous=FULL",
                "foreign_keys=ON",
                f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
            ):
                cursor.execute(f"PRAGMA {pragma}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        options: dict[str, Any] = dict(connection.get_execution_options())
        connection.exec_driver_sql("BEGIN IMMEDIATE" if options.get(WRITE_OPTION) else "BEGIN")

    return engine
