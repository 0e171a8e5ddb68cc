"""Alembic environment: the store runs migrations itself, on a connection it passes in.

``Store.open`` (through ``controlplane.store.migrate``) puts an open connection, already inside a
transaction, in ``config.attributes["connection"]``; there is no ``alembic.ini`` and no URL here.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from controlplane.store.schema import metadata


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError("controlplane.store migrations run through controlplane.store.migrate, with a connection")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("controlplane.store migrations do not run offline")
run_migrations_online()
