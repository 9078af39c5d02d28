"""Turning a storage URL into an Optuna storage, with heartbeats so a killed worker's trial is
failed and retried instead of staying RUNNING forever."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import optuna
import sqlalchemy.exc
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
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}} if sqlite_path(url) else {}
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=int(os.environ.get("NAS_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS)),
            grace_period=int(os.environ.get("NAS_GRACE_SECONDS", GRACE_SECONDS)),
            heartbeat_stale_trial_callback=retry,
        )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"cannot open storage {url}: {reason}") from None
