"""Schema migrations: the migrated schema is exactly the metadata, opening is idempotent and race-free."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import URL, make_url

from controlplane.store import SQLITE_FILENAME, Store, StoreError, sqlite_url
from controlplane.store.migrate import head_revision, migration_config
from controlplane.store.schema import metadata
from tests.controlplane.store.support import make_entry


def test_migrated_schema_equals_the_metadata(store: Store) -> None:
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
        differences = compare_metadata(context, metadata)

    assert differences == []


def test_migrated_schema_has_every_table_and_index(store: Store) -> None:
    inspector = inspect(store.engine)

    assert set(inspector.get_table_names()) == set(metadata.tables) | {"alembic_version"}
    assert {ix["name"] for ix in inspector.get_indexes("entry_selectors")} == {"ix_entry_selectors_digest"}
    assert {ix["name"] for ix in inspector.get_indexes("registration_entries")} >= {
        "ix_registration_entries_parent_id",
        "ix_registration_entries_spiffe_id",
    }


def test_opening_again_migrates_nothing_and_keeps_data(store_url: str) -> None:
    with Store.open(store_url) as first:
        entry = first.create_entry(make_entry("a"))
    with Store.open(store_url) as again, Store.open(store_url, migrate=False) as unmigrated:
        assert again.get_entry(entry.id) == entry
        assert unmigrated.current_revision() == 1
        with again.engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == head_revision()


def test_an_unmigrated_database_is_refused_without_migrate(store_url: str) -> None:
    with pytest.raises(StoreError) as caught:
        Store.open(store_url, migrate=False)

    assert (
        str(caught.value)
        == f"store: database schema is at revision None, this server needs {head_revision()}; migrate it"
    )


def test_downgrade_and_upgrade_again(store_url: str) -> None:
    Store.open(store_url).close()
    engine = create_engine(store_url)
    try:
        with engine.begin() as connection:
            config = migration_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()

    with Store.open(store_url) as store:
        assert store.count_entries() == 0


def test_servers_starting_together_migrate_once(store_url: str) -> None:
    opened: list[Store] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            opened.append(Store.open(store_url))
        except StoreError as err:
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        assert len(opened) == 4
        assert opened[0].create_entry(make_entry("a")).revision == 1
    finally:
        for store in opened:
            store.close()


def test_sqlite_store_is_a_wal_file_in_the_data_dir(tmp_path: Path) -> None:
    with Store.open(sqlite_url(tmp_path)) as store:
        store.create_entry(make_entry("a"))
        with store.engine.connect() as connection:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }

    assert pragmas == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 10_000}
    with sqlite3.connect(tmp_path / SQLITE_FILENAME) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "mysql://root@localhost/spire",
            'database URL must be sqlite:///<file> or postgresql+psycopg://...: "mysql://root@localhost/spire"',
        ),
        (
            "postgresql://u:hunter2@db/spire",
            'database URL must be sqlite:///<file> or postgresql+psycopg://...: "postgresql://u:***@db/spire"',
        ),
        ("sqlite://", 'SQLite store must be a file (an in-memory database is not shared by connections): "sqlite://"'),
        ("not a url", "database URL could not be parsed (it is not quoted, as it may hold a password)"),
    ],
)
def test_bad_urls_are_refused_without_showing_passwords(url: str, message: str) -> None:
    with pytest.raises(StoreError) as caught:
        Store.open(url)

    assert str(caught.value) == f"store: {message}"


def test_database_failures_are_store_errors_without_secrets(postgres_server: URL) -> None:
    url = make_url(postgres_server).set(password="hunter2", database="spiffe_store_no_such_database")

    with pytest.raises(StoreError) as caught:
        Store.open(url)

    message = str(caught.value)
    assert message.startswith('store: could not migrate the database schema: database error: "OperationalError: ')
    assert "spiffe_store_no_such_database" in message
    assert "hunter2" not in message


def test_sqlite_failures_are_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as caught:
        Store.open(sqlite_url(tmp_path / "missing-dir"))

    assert str(caught.value) == (
        'store: could not migrate the database schema: database error: "OperationalError: unable to open database file"'
    )
