"""nas.outage: a storage that waits out a database outage, or ends with one line past the limit.
SQLite's lock and a full database file here; PostgreSQL restarted and stopped under a running
study below."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psycopg
import pytest
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from nas import search, storage
from nas.storage import outage
from nas.study import search as study_search
from nas.study.objective import SearchOptions
from nas.studyfile import StudyConfig
from nas.storage.outage import CREATIONS, StorageUnavailable, is_outage, reason
from nas.storage import open_storage
from nas.study.trials import finished_trials
from nas.train.setup import RunSettings
from tests.pg import USER, Server, server_for_tests

# These tests ask and tell by hand on a storage with heartbeats, which Optuna pairs with optimize().
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")


def operational(message: str) -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError(message))


def wrapped(exc: Exception) -> optuna.exceptions.StorageInternalError:
    try:
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc
    except optuna.exceptions.StorageInternalError as wrapper:
        return wrapper


def test_optuna_is_held_below_its_next_major_release():
    """PatientStorage overrides RDBStorage's private methods (_create_new_trial,
    _get_prepared_new_trial, _get_stale_trial_ids): a major release may rename or change them."""
    import tomllib

    from packaging.requirements import Requirement  # matplotlib's dependency, so always here

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    (optuna_req,) = [Requirement(d) for d in pyproject["project"]["dependencies"] if Requirement(d).name == "optuna"]
    assert optuna.__version__ in optuna_req.specifier and "6.0" not in optuna_req.specifier


def test_outages_are_told_from_bad_requests():
    assert is_outage(operational("database is locked"))
    assert is_outage(wrapped(operational("server closed the connection unexpectedly")))
    assert not is_outage(wrapped(sqlalchemy.exc.DataError("INSERT", {}, ValueError("value too long"))))
    assert not is_outage(optuna.exceptions.StorageInternalError("no cause"))
    assert not is_outage(ValueError("Cannot tell a FAIL trial."))
    try:  # Optuna repeats a query in the same session after the connection dropped
        try:
            raise operational("terminating connection due to administrator command")
        except sqlalchemy.exc.OperationalError:
            raise sqlalchemy.exc.PendingRollbackError("Can't reconnect until invalid transaction is rolled back")
    except sqlalchemy.exc.PendingRollbackError as repeated:
        assert is_outage(wrapped(repeated))
        assert reason(wrapped(repeated)) == "terminating connection due to administrator command"
    assert reason(wrapped(operational("connection refused\n\tIs the server running?"))) == "connection refused"


@pytest.fixture
def fast(monkeypatch):
    """A one-second limit, short first waits, and a SQLite busy timeout of a fifth of a second."""
    monkeypatch.setenv("NAS_STORAGE_OUTAGE_SECONDS", "1")
    monkeypatch.setattr(outage, "FIRST_DELAY", 0.1)
    monkeypatch.setattr(storage, "SQLITE_BUSY_TIMEOUT", 0.2)


def new_study(url: str) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=open_storage(url))


def test_a_lock_held_past_the_limit_ends_with_one_line_and_the_study_stays_usable(tmp_path, fast, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = new_study(url)
    holder = sqlite3.connect(tmp_path / "s.db")
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(StorageUnavailable) as raised:
        study.ask()
    holder.rollback()
    assert raised.value.code == str(raised.value)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"storage {url} unreachable (database is locked); retrying for up to 1 s"]
    assert str(raised.value).startswith(f"error: storage {url} unreachable for 1 s (database is locked); rerun")
    with pytest.raises(StorageUnavailable):  # a storage that gave up stays given up, in every thread
        study.trials
    again = optuna.load_study(study_name="s", storage=open_storage(url))
    trial = again.ask()
    again.tell(trial, 1.0)
    assert [t.state for t in again.trials] == [TrialState.COMPLETE]


def test_a_lock_released_within_the_limit_costs_one_line_and_nothing_else(tmp_path, fast, monkeypatch, capsys):
    monkeypatch.setenv("NAS_STORAGE_OUTAGE_SECONDS", "30")
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = new_study(url)
    trial = study.ask()
    holder = sqlite3.connect(tmp_path / "s.db", check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(1.0, holder.rollback)
    release.start()
    trial.set_user_attr("epoch_acc", [97.5])
    study.tell(trial, 97.5)
    release.join()
    assert capsys.readouterr().err.splitlines() == [
        f"storage {url} unreachable (database is locked); retrying for up to 30 s"]
    assert study.trials[0].user_attrs == {"epoch_acc": [97.5]} and study.trials[0].value == 97.5


def test_a_full_database_file_ends_with_one_line_and_the_study_stays_usable(tmp_path, fast, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = new_study(url)
    trial = study.ask()
    pages = sqlite3.connect(tmp_path / "s.db").execute("PRAGMA page_count").fetchone()[0]
    # The disk fills up: the file may not grow past its present size.
    engine = study._storage._backend.engine
    sqlalchemy.event.listen(engine, "connect", lambda conn, _: conn.execute(f"PRAGMA max_page_count = {pages}"))
    engine.dispose()
    with pytest.raises(StorageUnavailable, match=r"unreachable for 1 s \(database or disk is full\)"):
        trial.set_user_attr("notes", "x" * 100_000)
    assert "database or disk is full" in capsys.readouterr().err
    again = optuna.load_study(study_name="s", storage=open_storage(url))
    again.tell(again.trials[0].number, 1.0)
    assert [t.state for t in again.trials] == [TrialState.COMPLETE]


def answer_lost_once(monkeypatch, cls, name):
    """The write reaches the database, but its answer does not come back, once."""
    original, lost = getattr(cls, name), []

    def call(*args, **kwargs):
        result = original(*args, **kwargs)
        if not lost:
            lost.append(True)
            raise wrapped(operational("server closed the connection unexpectedly"))
        return result

    monkeypatch.setattr(cls, name, call)
    return lost


def test_a_state_change_whose_answer_was_lost_is_not_made_twice(tmp_path, fast, monkeypatch):
    study = new_study(f"sqlite:///{tmp_path / 's.db'}")
    trial = study.ask()
    lost = answer_lost_once(monkeypatch, RDBStorage, "set_trial_state_values")
    study.tell(trial, 99.0)  # a plain repeat would find it COMPLETE and raise UpdateFinishedTrialError
    assert lost and [(t.state, t.value) for t in study.trials] == [(TrialState.COMPLETE, 99.0)]


@pytest.mark.parametrize("create", ["ask", "enqueue"])
def test_a_new_trial_whose_answer_was_lost_is_created_once(tmp_path, fast, monkeypatch, create):
    """The creation lands, its answer is lost, and the repeat finds it: one trial, RUNNING (ask) or
    queued (enqueue_trial, as the presets and the heartbeat retries are); a blind repeat would
    make a second. The trial shows nothing of how (no system or user attribute)."""
    study = new_study(f"sqlite:///{tmp_path / 's.db'}")
    lost = answer_lost_once(monkeypatch, RDBStorage, "_create_new_trial")
    if create == "ask":
        trial = study.ask()
    else:
        study.enqueue_trial({"x": 0.5})
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert lost and [t.number for t in study.trials] == [trial.number]
    stored = study.trials[0]
    assert stored.system_attrs == ({} if create == "ask" else {"fixed_params": {"x": 0.5}})
    assert stored.user_attrs == {}
    study.tell(trial, 1.0)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db:  # where the repeat found it
        assert db.execute(f"SELECT trial_id FROM {CREATIONS.name}").fetchall() == [(stored._trial_id,)]


def test_the_limit_comes_from_the_environment_and_the_storage_pickles(tmp_path, monkeypatch):
    monkeypatch.delenv("NAS_STORAGE_OUTAGE_SECONDS", raising=False)
    opened = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    assert opened.patience.seconds == 60
    assert pickle.loads(pickle.dumps(opened)).patience.seconds == 60
    monkeypatch.setenv("NAS_STORAGE_OUTAGE_SECONDS", "5")
    assert open_storage(f"sqlite:///{tmp_path / 's.db'}").patience.seconds == 5
    monkeypatch.setenv("NAS_STORAGE_OUTAGE_SECONDS", "soon")
    with pytest.raises(storage.StorageError, match="NAS_STORAGE_OUTAGE_SECONDS must be a whole number"):
        open_storage(f"sqlite:///{tmp_path / 's.db'}")


@pytest.mark.postgres
def test_a_connection_the_server_cut_mid_transaction_is_dropped_without_a_traceback(postgres, caplog):
    """What a restart does to a connection inside a transaction: the pool's rollback, as it takes
    the connection back, fails; SQLAlchemy logs that with a traceback at ERROR, which a command's
    stderr would show (Python prints records when no logging is configured)."""
    url = postgres.create_database("cut")
    opened = open_storage(url)
    try:
        connection = opened.engine.raw_connection()
        connection.cursor().execute("SELECT 1")  # a transaction is open
        with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user={USER} dbname=cut", autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = 'cut' AND pid <> pg_backend_pid()")
        with caplog.at_level("DEBUG", logger="sqlalchemy.pool"):
            connection.close()  # back to the pool: the rollback fails
        assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
        study = optuna.create_study(storage=opened)  # the pool opens a new connection
        assert study.trials == []
    finally:
        opened.close()


class PeerFailsTheFirstTrial:
    """An objective whose first trial a peer fails as stale while it trains, as happens when this
    worker's heartbeat could not reach the storage for longer than the grace period. The worker
    finds out when it stores the result, or, with `write_after`, at its next write (an epoch's
    accuracy)."""

    def __init__(self, url: str, write_after: bool):
        self.url, self.write_after, self.calls = url, write_after, 0

    def __call__(self, trial: optuna.Trial) -> float:
        self.calls += 1
        if self.calls == 1:
            peer = RDBStorage(self.url)
            peer.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            peer.engine.dispose()
            if self.write_after:
                trial.set_user_attr("epoch_acc", [1.0])
        return float(self.calls)


@pytest.mark.parametrize("write_after", [False, True])
def test_a_trial_a_peer_failed_during_the_outage_is_dropped_in_one_line(tmp_path, monkeypatch, capsys, write_after):
    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    objective = PeerFailsTheFirstTrial(url, write_after)
    monkeypatch.setattr(study_search, "Objective", lambda *args: objective)
    options = SearchOptions(storage=url, study="s", trials=2, epochs=1, subset=None, seed=0, data_dir=str(tmp_path),
                            run=RunSettings(device="cpu", threads=1), quiet=True, worker=1)
    study_search.run_worker(options, StudyConfig(pruner="none"), split="the objective brings its own")
    assert capsys.readouterr().err.splitlines() == [
        "worker 1: a peer failed this worker's trial as stale while the storage was unreachable, "
        "and queued its retry; this result is dropped"]
    study = optuna.load_study(study_name="s", storage=url)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]


# --- a real PostgreSQL server, restarted and stopped under a running 2-worker study -------------

REPO_ROOT = Path(__file__).resolve().parent.parent
# Heartbeats every second. The grace: 3 s where a test waits for dead trials to go stale; where
# none dies, the default 30 s, so that a live trial whose heartbeat waited out a restart (backing
# off up to outage.MAX_DELAY between attempts) is never taken for dead.
HEARTBEAT = {"NAS_HEARTBEAT_SECONDS": "1", "NAS_GRACE_SECONDS": "3"}
SURVIVED = {"NAS_HEARTBEAT_SECONDS": "1", "NAS_GRACE_SECONDS": "30"}


@pytest.fixture(scope="module")
def own_postgres():
    """A server of these tests' own: they stop it, and the shared one serves other tests meanwhile."""
    yield from server_for_tests()


def start_search(url: str, data_dir: Path, trials: int, env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "nas.search", "--trials", str(trials), "--epochs", "1", "--subset", "500",
               "--workers", "2", "--storage", url, "--data-dir", str(data_dir), "--quiet",
               "--study-file", str(REPO_ROOT / "tests" / "fixtures" / "outage-study.toml")]
    return subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_a_running_trial(server: Server, database: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(f"host=127.0.0.1 port={server.port} user={USER} dbname={database}") as conn:
                if conn.execute("SELECT count(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0]:
                    return
        except psycopg.Error:
            pass  # the tables are not there yet
        time.sleep(0.3)
    raise AssertionError("no trial started")


def assert_complete(url: str, trials: int) -> None:
    storage = open_storage(url)
    try:
        study = optuna.load_study(study_name="mnist-8k", storage=storage)
        assert len(finished_trials(study)) >= trials
        assert not [t.number for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    finally:
        storage.close()


@pytest.mark.postgres
def test_a_postgres_restart_mid_study_costs_no_trial_and_no_traceback(own_postgres, data_dir):
    url = own_postgres.create_database("restarted")
    search_run = start_search(url, data_dir, 6, SURVIVED)
    wait_for_a_running_trial(own_postgres, "restarted")
    own_postgres.restart()
    out, err = search_run.communicate(timeout=240)
    assert search_run.returncode == 0, err
    assert "Traceback" not in out + err
    assert_complete(url, 6)


def hold_the_study_once_queued(server: Server, database: str, timeout: float = 120) -> psycopg.Connection:
    """Wait until the search has made the study and queued Model 3, then lock the study's row and
    return the connection that holds the lock, in its open transaction (closing it lets go).

    Optuna creates every trial under that lock (FOR UPDATE), so from then on the search can create
    none: it can claim the queued Model 3, train it and store it, nothing more. However fast trials
    train, the outage then finds at most one finished and at most one running. (FOR NO KEY UPDATE
    blocks Optuna's FOR UPDATE but not the key checks of rows that refer to the study.)"""
    conn = psycopg.connect(f"host=127.0.0.1 port={server.port} user={USER} dbname={database}")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                if conn.execute("SELECT study_id FROM studies FOR NO KEY UPDATE").fetchall():
                    trials = conn.execute("SELECT count(*) FROM trials").fetchone()[0]
                    if trials:
                        # Its workers start seconds after the search queued Model 3; they cannot
                        # have made another trial yet.
                        assert trials == 1, f"{trials} trials made before the study was locked"
                        return conn
            except psycopg.errors.UndefinedTable:
                pass  # the search has not made Optuna's tables yet
            conn.rollback()
            time.sleep(0.05)
        raise AssertionError("the search queued no trial")
    except BaseException:
        conn.close()
        raise


def wait_until_claimed(conn: psycopg.Connection, timeout: float = 120) -> None:
    """Until no trial is queued: a worker claimed Model 3 (the lock's transaction sees it: each
    statement reads what is committed at its start)."""
    deadline = time.monotonic() + timeout
    while conn.execute("SELECT count(*) FROM trials WHERE state = 'WAITING'").fetchone()[0]:
        assert time.monotonic() < deadline, "no worker claimed the queued trial"
        time.sleep(0.05)


def wait_until_stale(url: str, monkeypatch: pytest.MonkeyPatch, timeout: float = 60) -> list[int]:
    """Until every trial left RUNNING is one that a worker's next look would fail as stale
    (PatientStorage._stale_or_orphaned); returns their numbers.

    A worker gives up after the outage limit, here 3 s, as long as the grace: as its process
    ends, its trial's last heartbeat is only just about the grace old. A rerun's workers look at
    each trial's start; one that looked a moment too soon would see nothing, and the rerun could
    reach its target before any later look, leaving the dead trial RUNNING, or its retry queued.
    (By default the limit, 60 s, is twice the grace, 30 s.)"""
    for name, value in HEARTBEAT.items():
        monkeypatch.setenv(name, value)
    storage = open_storage(url)
    try:
        study = optuna.load_study(study_name="mnist-8k", storage=storage)
        deadline = time.monotonic() + timeout
        while True:
            running = {t._trial_id: t.number for t in study.get_trials(states=(TrialState.RUNNING,))}
            if set(running) <= set(storage._get_stale_trial_ids(study._study_id)):
                return sorted(running.values())
            assert time.monotonic() < deadline, "the dead trials never went stale"
            time.sleep(0.2)
    finally:
        storage.close()


@pytest.mark.postgres
def test_an_outage_past_the_limit_ends_in_one_line_and_the_rerun_finishes(own_postgres, data_dir, monkeypatch):
    """The server stops mid-study for longer than the limit: each process ends with one line; the
    same command, rerun once it is back, fails the trial the outage killed, retries it, and
    finishes the study.

    Nothing here may depend on timing. Two things did: how many trials the first run had finished
    when the outage hit (trials of 1 epoch on 500 images take a fraction of a second, and a run
    already at its target, or one short, leaves the dead trial RUNNING or its retry queued), and
    whether the rerun's workers looked for dead trials before these had gone stale."""
    url = own_postgres.create_database("stopped")
    env = {**HEARTBEAT, "NAS_STORAGE_OUTAGE_SECONDS": "3"}
    search_run = start_search(url, data_dir, 6, env)
    try:
        lock = hold_the_study_once_queued(own_postgres, "stopped")
        try:
            wait_until_claimed(lock)
            own_postgres.stop_server()  # cuts every session, the lock's too
        finally:
            lock.close()
        try:
            out, err = search_run.communicate(timeout=120)
        finally:
            own_postgres.start_again()
    finally:
        if search_run.poll() is None:
            search_run.kill()
            search_run.communicate()
    assert search_run.returncode != 0
    assert "Traceback" not in out + err
    # Each process (two workers and the one that watches them) says it once as the outage begins
    # and once as it gives up; the watcher also names the workers that stopped.
    shown = url.replace("postgresql+psycopg://", "")
    said = [line for line in err.splitlines() if shown in line]
    assert said and all(re.fullmatch(rf"storage \S+{shown} unreachable \(.+\); retrying for up to 3 s", line)
                        or re.fullmatch(rf"error: storage \S+{shown} unreachable for 3 s \(.+\); rerun the same "
                                        r"command to resume the study once it is back \(.+\)", line)
                        for line in said), err
    assert any(line.startswith("error: storage") for line in said)
    dead = wait_until_stale(url, monkeypatch)
    assert dead in ([], [0])  # Model 3, if it was still training
    rerun = start_search(url, data_dir, 6, env)
    out, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err
    assert "Traceback" not in out + err
    assert_complete(url, 6)
    storage = open_storage(url)
    try:
        trials = optuna.load_study(study_name="mnist-8k", storage=storage).trials
    finally:
        storage.close()
    assert [t.number for t in trials if t.state == TrialState.FAIL] == dead
    assert [t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs] == dead
