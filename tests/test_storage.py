"""Storage URLs and the SQLite claim lock."""

from __future__ import annotations

import multiprocessing

import optuna
import pytest

from nas.storage import SQLiteStorage, StorageError, open_storage

QUEUED = 40


def claim_all(url: str, start, results) -> None:
    """Ask for trials until the queue is empty; report which queued trials this process got."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="race", storage=open_storage(url))
    start.wait()
    got = []
    for _ in range(QUEUED):
        trial = study.ask()
        if "queued" not in trial.user_attrs:
            break  # the queue is empty: this one was freshly sampled
        got.append(trial.user_attrs["queued"])
    results.put(got)


def test_two_processes_never_claim_the_same_queued_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 'race.db'}"
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    for i in range(QUEUED):
        study.enqueue_trial({"x": float(i)}, user_attrs={"queued": i})
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    procs = [context.Process(target=claim_all, args=(url, start, results)) for _ in range(2)]
    for p in procs:
        p.start()
    claimed = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    everything = claimed[0] + claimed[1]
    assert sorted(everything) == list(range(QUEUED)), "a queued trial was claimed twice or lost"


def test_sqlite_urls_get_the_locking_storage(tmp_path):
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 'a.db'}"), SQLiteStorage)


def test_unopenable_storage_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        open_storage(f"sqlite:///{tmp_path / 'no' / 'a.db'}")
    with pytest.raises(StorageError, match="no such database file"):
        open_storage(f"sqlite:///{tmp_path / 'b.db'}", must_exist=True)
