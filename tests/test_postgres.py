"""nas.storage on a real PostgreSQL server, where workers on many machines meet."""

from __future__ import annotations

import multiprocessing

import optuna
import pytest

from nas.storage import StorageError, open_storage

DATABASES = 5


def open_each(urls: list[str], start, results) -> None:
    """Open every database as soon as the other process does too; report what went wrong."""
    errors = []
    for url in urls:
        start.wait()
        try:
            open_storage(url)
        except StorageError as exc:
            errors.append(str(exc))
    results.put(errors)


@pytest.mark.postgres
def test_workers_starting_together_on_an_empty_database_both_get_in(postgres):
    """Scaled compose workers start at once; the first to arrive creates Optuna's tables, and the
    other must not fail on the collision."""
    urls = [postgres.create_database(f"fresh{i}") for i in range(DATABASES)]
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    procs = [context.Process(target=open_each, args=(urls, start, results)) for _ in range(2)]
    for p in procs:
        p.start()
    errors = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    assert errors == [[], []]
    for url in urls:
        storage = optuna.storages.RDBStorage(url)
        assert storage.get_all_studies() == []
        storage.engine.dispose()  # else its connection is left to the garbage collector


@pytest.mark.postgres
def test_a_missing_database_is_one_storage_error(postgres):
    with pytest.raises(StorageError, match='cannot open storage .*"no_such_database" does not exist'):
        open_storage(f"postgresql+psycopg://nas@127.0.0.1:{postgres.port}/no_such_database")
