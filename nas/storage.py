"""Turning a storage URL into an Optuna storage, with heartbeats so a killed worker's trial is
failed and retried instead of staying RUNNING forever."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import optuna
import sqlalchemy.exc
from filelock import FileLock
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage

# A running trial's worker writes a heartbeat this often; a trial whose heartbeat is GRACE_SECONDS
# old is stale (its worker died): failed, then retried once. The environment can shorten both
# (the tests kill workers and should not wait half a minute).
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30
MAX_RETRY = 1
SQLITE_BUSY_TIMEOUT = 60  # seconds a SQLite writer waits on the lock instead of failing at once


warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class SQLiteStorage(RDBStorage):
    """RDBStorage for one SQLite file shared by several worker processes.

    A worker claims a queued (WAITING) trial, such as the enqueued Model 3, by reading that it is
    still waiting and marking it RUNNING. PostgreSQL makes the two one step (SELECT ... FOR
    UPDATE); SQLite ignores FOR UPDATE, so two workers could both read WAITING and train the same
    trial (the second then fails with "Cannot tell a COMPLETE trial"). A lock file beside the
    database serializes the claim."""

    def __init__(self, url: str, lock_path: Path, **kwargs):
        super().__init__(url, **kwargs)
        self.lock_path = lock_path

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        if state != optuna.trial.TrialState.RUNNING:
            return super().set_trial_state_values(trial_id, state, values)
        with FileLock(self.lock_path):
            return super().set_trial_state_values(trial_id, state, values)


class StorageError(RuntimeError):
    """A storage URL that cannot be opened."""


def default_url(study_name: str) -> str:
    return f"sqlite:///studies/{study_name}.db"


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite:/// URL, or None for other URLs."""
    prefix = "sqlite:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


def journal_path(url: str) -> Path | None:
    """The log file of a journal:/// URL (Optuna's journal file storage), or None."""
    prefix = "journal:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


def open_storage(url: str, must_exist: bool = False) -> optuna.storages.BaseStorage:
    """Open `url`; with `must_exist`, refuse to create a new database file (replay, reports)."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    file = sqlite_path(url) or journal_path(url)
    if file is not None:
        if must_exist and not file.is_file():
            raise StorageError(f"{url}: no such database file")
        if not file.parent.is_dir():
            raise StorageError(f"{url}: directory {file.parent} does not exist")
    try:
        if journal_path(url) is not None:
            return JournalStorage(JournalFileBackend(str(journal_path(url))))
        heartbeat = {
            "heartbeat_interval": int(os.environ.get("NAS_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS)),
            "grace_period": int(os.environ.get("NAS_GRACE_SECONDS", GRACE_SECONDS)),
            "heartbeat_stale_trial_callback": retry,
        }
        database = sqlite_path(url)
        if database is not None:
            return SQLiteStorage(url, database.with_name(database.name + ".lock"),
                                 engine_kwargs={"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}, **heartbeat)
        return RDBStorage(url, **heartbeat)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"cannot open storage {url}: {reason}") from None
