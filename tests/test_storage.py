"""Storage URLs and the SQLite claim lock."""

from __future__ import annotations

import multiprocessing

import optuna
import pytest
from optuna.trial import TrialState

from nas.storage import SQLiteStorage, StorageError, heartbeat_settings, open_storage
from tests.waiting import wait_for

QUEUED = 40
STALE = 40
# These tests play a worker with ask() and fail_stale_trials() by hand, which Optuna warns of.
HAND_RUN = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed",
                                      "ignore::optuna.exceptions.ExperimentalWarning")


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


def fail_stale(url: str, start) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="stale", storage=open_storage(url))
    start.wait()
    optuna.storages.fail_stale_trials(study)


@HAND_RUN
def test_two_processes_fail_and_retry_a_stale_trial_once(tmp_path, monkeypatch):
    """Two workers finding the same dead trials: each is failed once and retried once."""
    monkeypatch.setenv("NAS_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("NAS_GRACE_SECONDS", "2")
    url = f"sqlite:///{tmp_path / 'stale.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="stale", storage=storage)
    asked = []
    for _ in range(STALE):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        storage.record_heartbeat(trial._trial_id)  # then its worker "dies": no more heartbeats
        asked.append(trial._trial_id)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    procs = [context.Process(target=fail_stale, args=(url, start)) for _ in range(2)]
    for p in procs:
        p.start()
    # While the workers start: until every trial is stale (SQLite stamps whole seconds).
    wait_for(lambda: set(asked) <= set(storage._get_stale_trial_ids(study._study_id)), "the trials to go stale")
    start.wait(timeout=120)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    trials = optuna.load_study(study_name="stale", storage=url).trials
    assert [t.state for t in trials[:STALE]] == [TrialState.FAIL] * STALE
    retried = sorted(t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs)
    assert retried == list(range(STALE)), "a stale trial was retried twice or not at all"


@HAND_RUN
def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_after_the_grace(tmp_path, monkeypatch):
    """Optuna never finds a RUNNING trial without a heartbeat stale; a nas worker killed between
    creating its trial and the first heartbeat would leave it RUNNING for good."""
    monkeypatch.setenv("NAS_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("NAS_GRACE_SECONDS", "2")
    storage = open_storage(f"sqlite:///{tmp_path / 'orphan.db'}")
    study = optuna.create_study(study_name="orphan", storage=storage)
    orphan = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # no heartbeat, ever
    optuna.storages.fail_stale_trials(study)
    assert study.trials[orphan.number].state == TrialState.RUNNING, "failed within the grace period"
    wait_for(lambda: orphan._trial_id in storage._get_stale_trial_ids(study._study_id),
             "the orphan to be older than the grace period")
    alive = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage.record_heartbeat(alive._trial_id)
    optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.trials}
    assert states[orphan.number] == TrialState.FAIL
    assert states[alive.number] == TrialState.RUNNING
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retries) == 1 and retries[0].state == TrialState.WAITING


@pytest.mark.parametrize("heartbeat, grace, message", [
    ("abc", None, "NAS_HEARTBEAT_SECONDS must be a whole number"),
    (None, "0", "NAS_GRACE_SECONDS must be a whole number"),
    ("10", "5", "must be longer than the heartbeat interval"),
])
def test_bad_heartbeat_settings_are_one_clear_error(heartbeat, grace, message, monkeypatch, tmp_path):
    for name, value in (("NAS_HEARTBEAT_SECONDS", heartbeat), ("NAS_GRACE_SECONDS", grace)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(StorageError, match=message):
        open_storage(f"sqlite:///{tmp_path / 'h.db'}")


def test_heartbeat_defaults_and_overrides(monkeypatch):
    monkeypatch.delenv("NAS_HEARTBEAT_SECONDS", raising=False)
    monkeypatch.delenv("NAS_GRACE_SECONDS", raising=False)
    assert heartbeat_settings() == (10, 30)
    monkeypatch.setenv("NAS_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("NAS_GRACE_SECONDS", "3")
    assert heartbeat_settings() == (1, 3)


def test_sqlite_urls_get_the_locking_storage(tmp_path):
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 'a.db'}"), SQLiteStorage)


def test_unopenable_storage_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        open_storage(f"sqlite:///{tmp_path / 'no' / 'a.db'}")
    with pytest.raises(StorageError, match="no such database file"):
        open_storage(f"sqlite:///{tmp_path / 'b.db'}", must_exist=True)
