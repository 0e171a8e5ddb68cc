"""Schema migrations with Alembic, run in code: no ``alembic.ini`` is needed at run time.

The scripts live in ``controlplane/store/migrations`` (shipped as package data). Migrations run
in one transaction that first takes a lock, so two servers starting together on one PostgreSQL
database (or two processes on one SQLite file) migrate once, one after the other.

To write a new revision, change ``schema.py``, then add a script under ``migrations/versions``
by hand or with ``alembic.command.revision(migration_config(), message, autogenerate=True)``
against a database at head; the schema test checks the result matches the metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from controlplane.store.engine import WRITE_OPTION

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock key: "spiffe" in ASCII, an arbitrary constant shared by every server.
_ADVISORY_LOCK_KEY: Final = 0x737069666665


def migration_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(migration_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at, or None before the first migration."""
    with engine.connect() as connection, connection.begin():
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest schema; a database already there is left as it is."""
    config = migration_config()
    with engine.connect() as connection:
        connection.execution_options(**{WRITE_OPTION: True})
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
