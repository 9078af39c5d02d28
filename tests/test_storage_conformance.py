"""Optuna's own storage conformance suite (optuna.testing.pytest_storages.StorageTestCase) run
against every storage nas.storage.open_storage returns: SQLite with the claim lock, the journal
file, and PostgreSQL. nas adds outage patience, heartbeats and idempotent trial creation to
Optuna's storages; what a study sees through them must stay exactly what Optuna's would show."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from optuna.storages import BaseStorage
from optuna.storages.journal import JournalStorage
from optuna.testing.pytest_storages import StorageTestCase

from nas.storage import SQLiteStorage, open_storage
from nas.storage.outage import PatientStorage
from tests.pg import USER, Server

# Optuna's tables that say which schema the database holds: kept between tests, as Optuna would
# find them in any database it has opened once.
SCHEMA_TABLES = ("alembic_version", "version_info")


@pytest.fixture(scope="module")
def empty_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database with Optuna's tables and no study, for each SQLite case to copy: creating
    the tables costs half a second of synced writes, copying the file a millisecond."""
    path = tmp_path_factory.mktemp("conformance") / "empty.db"
    opened = open_storage(f"sqlite:///{path}")
    assert isinstance(opened, SQLiteStorage)
    opened.close()
    return path


@pytest.fixture(scope="module")
def conformance_database(postgres: Server) -> str:
    """One database for the module's PostgreSQL cases, emptied before each (postgres_storage)."""
    return postgres.create_database("conformance")


def empty(server: Server, database: str) -> None:
    """Every row of the database gone, as in a new one, but the tables kept: emptying takes a few
    milliseconds where a new database and Optuna's tables take a few hundred."""
    with psycopg.connect(f"host=127.0.0.1 port={server.port} user={USER} dbname={database}",
                         autocommit=True) as conn:
        tables = [name for (name,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                  if name not in SCHEMA_TABLES]
        if tables:
            conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")


@pytest.fixture(params=["sqlite", "journal", pytest.param("postgresql", marks=pytest.mark.postgres)])
def storage(request: pytest.FixtureRequest, tmp_path) -> Iterator[BaseStorage]:
    """What open_storage returns for each kind of URL, on an empty database (the fixture
    StorageTestCase's cases take)."""
    if request.param == "sqlite":
        database = shutil.copy(request.getfixturevalue("empty_sqlite"), tmp_path / "conformance.db")
        opened = open_storage(f"sqlite:///{database}")
        assert isinstance(opened, SQLiteStorage)
    elif request.param == "journal":
        opened = open_storage(f"journal:///{tmp_path / 'conformance.log'}")
        assert isinstance(opened, JournalStorage)
    else:
        url = request.getfixturevalue("conformance_database")
        empty(request.getfixturevalue("postgres"), "conformance")
        opened = open_storage(url)
        assert type(opened) is PatientStorage
    yield opened
    if isinstance(opened, PatientStorage):
        opened.close()


class TestOpenStorage(StorageTestCase):
    """Every case of Optuna's suite, on each storage above."""
