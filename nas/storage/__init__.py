"""Turning a storage URL into an Optuna storage, with heartbeats so a killed worker's trial is
failed and retried instead of staying RUNNING forever, and patience so that a database outage of
up to NAS_STORAGE_OUTAGE_SECONDS costs no trial (nas.storage.outage)."""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import sqlalchemy.exc
from filelock import FileLock
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage

from nas.errors import NasError
from nas.storage.outage import OUTAGE_SECONDS, Patience, PatientStorage
from nas.storage.urls import artifact_dir_for, default_url, journal_path, sqlite_path

# A running trial's worker writes a heartbeat this often; a trial whose heartbeat is GRACE_SECONDS
# old is stale (its worker died): failed, then retried once. The environment can shorten both
# (the tests kill workers and should not wait half a minute).
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30
MAX_RETRY = 1
SQLITE_BUSY_TIMEOUT = 60  # seconds a SQLite writer waits on the lock instead of failing at once


class SQLiteStorage(PatientStorage):
    """RDBStorage for one SQLite file shared by several worker processes.

    A worker claims a queued (WAITING) trial, such as the enqueued Model 3, by reading that it is
    still waiting and marking it RUNNING; a worker that finds a trial's heartbeat stale reads that
    it is still running and marks it FAIL, then queues its retry. PostgreSQL makes each read and
    write one step (SELECT ... FOR UPDATE); SQLite ignores FOR UPDATE, so two workers could both
    claim the same trial (the second then fails with "Cannot tell a COMPLETE trial") or both fail
    and retry the same stale one. A lock file beside the database serializes state changes, a
    few per trial."""

    def __init__(self, url: str, lock_path: Path, **kwargs):
        super().__init__(url, **kwargs)
        self.lock_path = lock_path

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        with FileLock(self.lock_path):
            return super().set_trial_state_values(trial_id, state, values)


class StorageError(NasError):
    """A storage URL that cannot be opened."""


def env_seconds(name: str, default: int) -> int:
    """A whole number of seconds from the environment, `default` when unset."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) == 0:
        raise StorageError(f"{name} must be a whole number of seconds above 0, not {text!r}")
    return int(text)


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: the defaults, or NAS_HEARTBEAT_SECONDS and
    NAS_GRACE_SECONDS."""
    interval = env_seconds("NAS_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS)
    grace = env_seconds("NAS_GRACE_SECONDS", GRACE_SECONDS)
    if grace <= interval:
        # Otherwise a live trial would be failed between two of its own heartbeats.
        raise StorageError(f"the grace period ({grace} s, NAS_GRACE_SECONDS) must be longer than the "
                           f"heartbeat interval ({interval} s, NAS_HEARTBEAT_SECONDS)")
    return interval, grace


def outage_seconds() -> int:
    """How long a worker waits for an unreachable storage before it stops: the default, or
    NAS_STORAGE_OUTAGE_SECONDS."""
    return env_seconds("NAS_STORAGE_OUTAGE_SECONDS", OUTAGE_SECONDS)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def created_once(open_rdb: Callable[[], RDBStorage], attempts: int = 5) -> RDBStorage:
    """Open an RDB storage that other workers may be opening at the same moment.

    The first to open an empty database creates Optuna's tables; two doing so at once (scaled
    compose workers starting together) collide, and the loser gets a unique-key violation or
    "already exists". By the time it tries again, the tables are there."""
    for attempt in range(1, attempts):
        try:
            return open_rdb()
        except sqlalchemy.exc.SQLAlchemyError as exc:
            if not (isinstance(exc, sqlalchemy.exc.IntegrityError) or "already exists" in str(exc)):
                raise
        time.sleep(0.5 * attempt)
    return open_rdb()


def open_storage(url: str, must_exist: bool = False, wait: bool = False) -> optuna.storages.BaseStorage:
    """Open `url`; with `must_exist`, refuse to create a new database file (replay, reports).

    Once open, a database storage waits out an outage (nas.storage.outage). Opening fails at once, since a
    database never reached is more often a wrong URL than an outage, unless `wait`: for a worker
    whose command has just reached it."""
    file = sqlite_path(url) or journal_path(url)
    if file is not None:
        if must_exist and not file.is_file():
            raise StorageError(f"{url}: no such database file")
        if not file.parent.is_dir():
            raise StorageError(f"{url}: directory {file.parent} does not exist")
    interval, grace = heartbeat_settings()
    seconds = outage_seconds()
    try:
        patience = Patience(url, seconds, say)
        with warnings.catch_warnings():
            # Optuna marks heartbeats and their retry callback experimental; they are what makes
            # a killed worker's trial come back, so a user has nothing to act on in the warning.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if wait:
                return patience.call(_open, url, interval, grace, patience)
            return _open(url, interval, grace, patience)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"cannot open storage {url}: {reason}") from None


def _open(url: str, interval: int, grace: int, patience: Patience) -> optuna.storages.BaseStorage:
    if journal_path(url) is not None:
        # Optuna's journal storage has no heartbeat: a killed worker's trial stays RUNNING.
        return JournalStorage(JournalFileBackend(str(journal_path(url))))
    heartbeat = {"heartbeat_interval": interval, "grace_period": grace,
                 "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)}
    database = sqlite_path(url)
    if database is not None:
        return created_once(lambda: SQLiteStorage(
            url, database.with_name(database.name + ".lock"),
            engine_kwargs={"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}, **heartbeat, patience=patience))
    # pool_pre_ping: after a server restart, pooled connections are dead; test each on checkout
    # and open a new one, instead of failing the first statement on it.
    return created_once(lambda: PatientStorage(url, engine_kwargs={"pool_pre_ping": True}, patience=patience,
                                                      **heartbeat))
