"""Fixtures: every store test runs on SQLite (a file under tmp_path) and on PostgreSQL.

PostgreSQL comes from ``SPIFFE_TEST_POSTGRES_URL`` (default: trust auth as ``postgres`` on
127.0.0.1:5432, database ``test``). Each test module gets a uniquely named database (created from
``template0``, dropped afterwards) and each test a fresh schema in it (``search_path`` set in the
URL): a schema costs a millisecond where a database costs 0.1 s. Separate databases keep
concurrent runs apart, NOTIFY channels included. If PostgreSQL cannot be reached the PostgreSQL
tests fail with a message saying so; they are never skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import psycopg
import pytest
from sqlalchemy.engine import URL, make_url

from controlplane.store import Store, sqlite_url

DEFAULT_POSTGRES_URL: Final = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DATABASE_PREFIX: Final = "spiffe_store_test_"
DATABASES: Final = ("sqlite", "postgresql")


def postgres_url() -> URL:
    return make_url(os.environ.get("SPIFFE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL))


def _admin_conninfo(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_server() -> URL:
    """The PostgreSQL URL, checked to be reachable once per session; failing (not skipping) if not."""
    url = postgres_url()
    try:
        with psycopg.connect(_admin_conninfo(url), connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as err:
        pytest.fail(
            f"PostgreSQL is not reachable at {url.render_as_string(hide_password=True)} ({err}). "
            "The store's tests need it: start PostgreSQL (the Makefile does) or set SPIFFE_TEST_POSTGRES_URL.",
            pytrace=False,
        )
    return url


@contextmanager
def postgres_database(server: URL) -> Iterator[URL]:
    """A new, empty PostgreSQL database with a unique name, dropped afterwards."""
    name = f"{DATABASE_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_conninfo(server), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield server.set(database=name)
    finally:
        with psycopg.connect(_admin_conninfo(server), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def postgres_schema(database: URL) -> Iterator[URL]:
    """A new, empty schema in ``database``, as the URL of a store that uses it; dropped afterwards."""
    name = f"store_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_conninfo(database), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield database.update_query_dict({"options": f"-csearch_path={name}"})
    finally:
        with psycopg.connect(_admin_conninfo(database), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{name}" CASCADE')


@pytest.fixture(scope="module")
def module_postgres(postgres_server: URL) -> Iterator[URL]:
    """This test module's own PostgreSQL database."""
    with postgres_database(postgres_server) as url:
        yield url


@contextmanager
def empty_store_url(request: pytest.FixtureRequest, directory: Path) -> Iterator[str]:
    """The URL of an empty store on the database ``request.param`` names."""
    if request.param == "sqlite":
        yield sqlite_url(directory)
        return
    database: URL = request.getfixturevalue("module_postgres")
    with postgres_schema(database) as url:
        yield url.render_as_string(hide_password=False)


@pytest.fixture(params=DATABASES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty store, once per database."""
    with empty_store_url(request, tmp_path) as url:
        yield url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store.open(store_url) as opened:
        yield opened
