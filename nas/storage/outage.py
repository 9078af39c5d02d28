"""Riding out a database outage: an RDB storage that, while its database is unreachable (a
PostgreSQL restart or failover, a dropped connection, a SQLite lock held past the busy timeout, a
full disk), waits with backoff and repeats the call, for up to a limit; past it the process ends
with one line.

What is repeated, and why that is safe when a write reached the database but its answer was lost:
- reads, the heartbeat, user/system attributes and intermediate values: the same write twice
  leaves the same row (Optuna upserts them);
- a parameter: the second insert hits the unique key, which Optuna ignores;
- a state change: before repeating, the trial is read back; if it already has the state (and
  values) asked for, the first attempt landed and the call reports success. A queued trial found
  RUNNING is taken as ours; were it a peer's claim, both train it and the one that stores second
  drops its result (the worker loop, nas.search.run_worker);
- a new trial: each creation carries a fresh key, written in the same transaction as the trial
  to a table of nas's own (CREATIONS, nas_trial_creations: key -> trial id), and a repeat that
  finds its key returns that trial, so a lost answer never leaves a second, ownerless RUNNING
  trial (one without a heartbeat is failed only after the grace period, as an orphan:
  PatientStorage._stale_or_orphaned), nor a second queued copy of an enqueued or retried one;
- a new study: a repeat finds the name taken and loads the study instead.
Deleting a study is not repeated.

Why the creation key lives in a table of its own, and not on the trial. The trial must show
nothing that Optuna's own storages would not: Optuna's storage conformance suite
(tests/test_storage_conformance.py) compares every FrozenTrial field, and a trial copied with
add_trials or exported must not carry bookkeeping along. The alternatives fail:
- the key as a system attribute (nas's first design) shows in every FrozenTrial and its copies;
- the key as a system attribute removed in the same transaction: the repeat comes in a later
  transaction, after the commit, and finds nothing; removed in a later transaction, it shows in
  between, and for good when the worker dies first;
- the key kept in the creating process only, matched on what Optuna stores anyway (a template's
  datetime_start stamped to the microsecond): a queued trial (enqueue_trial, a heartbeat retry)
  has no datetime_start, a worker that claims it overwrites the field, add_trials copies keep
  their original's, and two processes can stamp the same microsecond, so a repeat could take a
  peer's trial for its own or miss its own.
The row is written inside the transaction that creates the trial, so it exists if and only if the
trial does: nothing is left when the creation rolls back, and a repeat cannot miss a creation that
landed. The table is created, if missing, by the first trial creation of a process (so opening a
database to read it writes nothing, as before); its foreign key cascades when Optuna deletes a
study on PostgreSQL (SQLite does not enforce foreign keys: rows of a deleted study's trials stay,
unread, since every key is used by one call only). Optuna ignores tables it does not know (its
schema check reads only its alembic version).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.storages._rdb import models  # the trial tables, to find a creation that landed
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

OUTAGE_SECONDS = 60  # how long a worker waits for its database before giving up
FIRST_DELAY, MAX_DELAY = 0.5, 5.0  # seconds between attempts: doubling from the first, capped

# nas's own table: which trial each creation call made, by the call's key (see the docstring).
_METADATA = sqlalchemy.MetaData()
# Optuna's trials table, declared here only so that the foreign key resolves; never created here.
sqlalchemy.Table("trials", _METADATA, sqlalchemy.Column("trial_id", sqlalchemy.Integer, primary_key=True))
CREATIONS = sqlalchemy.Table(
    "nas_trial_creations", _METADATA,
    sqlalchemy.Column("create_key", sqlalchemy.String(32), primary_key=True),
    sqlalchemy.Column("trial_id", sqlalchemy.Integer,
                      sqlalchemy.ForeignKey("trials.trial_id", ondelete="CASCADE"), nullable=False, index=True),
)
# The key of the trial creation in progress in this thread: set by PatientStorage._create_new_trial
# for all its attempts, read by _get_prepared_new_trial inside each attempt's transaction.
_create_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("nas_create_key", default=None)


class StorageUnavailable(SystemExit):
    """The storage stayed unreachable past the limit; str() is the one line to show.

    A SystemExit, so that every command ends with that line and status 1, never a traceback:
    Optuna's trial loop records an ordinary exception as the trial's failure (one more storage
    call) and re-raises it, where it lets SystemExit pass; a spawned worker process prints the
    line and exits 1. Catch it to carry on."""

    def __str__(self) -> str:
        return str(self.code)


def is_outage(exc: BaseException | None) -> bool:
    """Whether `exc` says the database cannot be reached or written for now, rather than that the
    request was wrong: worth waiting for. Optuna wraps every SQLAlchemy error raised in a session
    in StorageInternalError, and a query it repeats in the same session after a lost connection
    fails with PendingRollbackError, so the whole chain of causes counts."""
    while exc is not None:
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def reason(exc: BaseException) -> str:
    """The database's own first line for an outage, e.g. "Connection refused"."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, sqlalchemy.exc.DBAPIError):
        cause = cause.__cause__ or cause.__context__
    cause = getattr(cause, "orig", None) or cause or exc  # the driver's error inside SQLAlchemy's
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    # psycopg prefixes where it tried ('connection failed: connection to server at ...: '); the
    # storage URL says that already.
    return lines[0].rsplit(": ", 1)[-1] if lines else type(cause).__name__


class Patience:
    """Calls into one storage that wait out an outage of up to `seconds`, shared by a process's
    threads (the heartbeat thread meets the same outage). `notify` gets one line when an outage
    begins; past the limit every call raises StorageUnavailable, from then on."""

    def __init__(self, url: str, seconds: int = OUTAGE_SECONDS, notify: Callable[[str], None] = print):
        self.seconds, self.notify = seconds, notify
        self.shown_url = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
        self._lock = threading.Lock()
        self._since: float | None = None
        self._gave_up: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def call(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        delay = FIRST_DELAY
        while True:
            if self._gave_up:
                raise StorageUnavailable(self._gave_up)
            started = time.monotonic()
            try:
                result = function(*args, **kwargs)
            except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as exc:
                if not is_outage(exc):
                    raise
                self._wait(started, reason(exc), delay)
                delay = min(2 * delay, MAX_DELAY)
                continue
            with self._lock:
                self._since = None
            return result

    def _wait(self, started: float, why: str, delay: float) -> None:
        with self._lock:
            if self._since is None:
                # From the failed attempt's start: a SQLite lock already cost its busy timeout.
                self._since = started
                self.notify(f"storage {self.shown_url} unreachable ({why}); retrying for up to {self.seconds} s")
            left = self._since + self.seconds - time.monotonic()
            if left <= 0 and not self._gave_up:
                self._gave_up = (f"error: storage {self.shown_url} unreachable for {self.seconds} s ({why}); "
                                 "rerun the same command to resume the study once it is back "
                                 "(NAS_STORAGE_OUTAGE_SECONDS sets the wait)")
        if left <= 0:
            raise StorageUnavailable(self._gave_up)
        time.sleep(min(delay, left))


class _QuietOutages(logging.Filter):
    """Drops the records of SQLAlchemy's connection pool about a connection that an outage broke.

    When the pool takes back a connection whose server went away mid-transaction (a restart, a
    stop, a failover), rolling it back fails; so does closing it. The pool then logs "Exception
    during reset or similar" (or "Exception closing connection"), traceback and all, at ERROR, and
    with no logging configured Python prints that on stderr: an outage then costs a traceback,
    not the one line Patience shows. The pool discards such a connection and opens a new one by
    itself, so nothing is lost with the record. A pool error for any other reason still shows."""

    def __init__(self, dbapi: Any):
        super().__init__()
        self.outages = (dbapi.OperationalError, dbapi.InterfaceError)  # the driver's own, unwrapped

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, self.outages) or is_outage(exc))


_quiet_outages: dict[Any, _QuietOutages] = {}


def quiet_pool_outages(engine: sqlalchemy.engine.Engine) -> None:
    """Keep an outage's broken connections out of stderr (_QuietOutages) for `engine`'s pool."""
    dbapi = engine.dialect.loaded_dbapi
    quiet = _quiet_outages.setdefault(dbapi, _QuietOutages(dbapi))
    logger = engine.pool.logger
    getattr(logger, "logger", logger).addFilter(quiet)  # SQLAlchemy wraps it when echo_pool is set


def _patient(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self: PatientStorage, *args: Any, **kwargs: Any) -> Any:
        return self.patience.call(method, self, *args, **kwargs)

    return call


class PatientStorage(RDBStorage):
    """RDBStorage whose calls wait out an outage (`patience`), and that closes its database
    connections when it is closed or garbage-collected.

    Optuna's RDBStorage never closes its engine: a dropped storage leaves its pooled connections to
    the garbage collector, which for PostgreSQL means a session held open on the server until then
    and a ResourceWarning from psycopg ("deleted while still open")."""

    def __init__(self, url: str, patience: Patience, **kwargs: Any):
        self.patience = patience
        try:
            super().__init__(url, **kwargs)
        except BaseException:
            # E.g. two workers creating the tables at once (nas.storage.created_once tries again
            # with a new storage): this one's connection would otherwise wait for the collector.
            if hasattr(self, "engine"):
                self.engine.dispose()
            raise
        quiet_pool_outages(self.engine)
        self._close_when_collected()

    def _close_when_collected(self) -> None:
        self._closer = weakref.finalize(self, self.engine.dispose)
        self._closer.atexit = False  # at exit the process's connections end anyway

    def close(self) -> None:
        """Close the pooled database connections now. A later call opens new ones."""
        self.remove_session()
        self._closer()
        self._close_when_collected()

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("_closer", None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        quiet_pool_outages(self.engine)
        self._close_when_collected()

    # The methods that open a session: the public ones that Optuna's cache does not bypass, and
    # the private ones it calls directly. The rest delegate to these.
    set_study_user_attr = _patient(RDBStorage.set_study_user_attr)
    set_study_system_attr = _patient(RDBStorage.set_study_system_attr)
    get_study_id_from_name = _patient(RDBStorage.get_study_id_from_name)
    get_study_name_from_id = _patient(RDBStorage.get_study_name_from_id)
    get_study_directions = _patient(RDBStorage.get_study_directions)
    get_study_user_attrs = _patient(RDBStorage.get_study_user_attrs)
    get_study_system_attrs = _patient(RDBStorage.get_study_system_attrs)
    get_trial_user_attrs = _patient(RDBStorage.get_trial_user_attrs)
    get_trial_system_attrs = _patient(RDBStorage.get_trial_system_attrs)
    get_all_studies = _patient(RDBStorage.get_all_studies)
    _set_trial_param = _patient(RDBStorage._set_trial_param)
    get_trial_param = _patient(RDBStorage.get_trial_param)
    set_trial_intermediate_value = _patient(RDBStorage.set_trial_intermediate_value)
    set_trial_user_attr = _patient(RDBStorage.set_trial_user_attr)
    set_trial_system_attr = _patient(RDBStorage.set_trial_system_attr)
    get_trial_id_from_study_id_trial_number = _patient(RDBStorage.get_trial_id_from_study_id_trial_number)
    get_trial = _patient(RDBStorage.get_trial)
    _get_trials = _patient(RDBStorage._get_trials)
    _get_best_trial_id = _patient(RDBStorage._get_best_trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self.patience.call(self._stale_or_orphaned, study_id)

    def _stale_or_orphaned(self, study_id: int) -> list[int]:
        """Optuna's stale trials (a heartbeat older than the grace period) and the orphans it
        leaves RUNNING for good: trials that started more than the grace period ago and never wrote
        a heartbeat, because their worker was killed, or lost its database, between creating the
        trial and its first heartbeat. Optuna keeps those on purpose, for ask-and-tell users who run
        without heartbeats; every nas trial runs inside Study.optimize with one, so here it is dead."""
        stale = RDBStorage._get_stale_trial_ids(self, study_id)
        grace = self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval
        # Optuna stores datetime_start in UTC, from the creating worker's clock
        started_before = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(seconds=grace)
        with _create_scoped_session(self.scoped_session) as session:
            orphans = (session.query(models.TrialModel.trial_id)
                       .filter(models.TrialModel.study_id == study_id,
                               models.TrialModel.state == TrialState.RUNNING,
                               models.TrialModel._datetime_start_utc < started_before,
                               ~models.TrialModel.heartbeats.any())
                       .all())
        return stale + [trial_id for (trial_id,) in orphans if trial_id not in stale]

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.patience.call(RDBStorage.record_heartbeat, self, trial_id)
        except StorageUnavailable:
            pass  # the heartbeat thread ends quietly; the trial's own thread says why at its next call

    def create_new_study(self, directions, study_name=None) -> int:
        return self.patience.call(super().create_new_study, directions, study_name)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        attempts = 0

        def attempt() -> bool:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                stored = RDBStorage.get_trial(self, trial_id)
                if stored.state == state and (values is None or stored.values == list(values)):
                    return True  # the previous attempt landed
            return RDBStorage.set_trial_state_values(self, trial_id, state, values)

        return self.patience.call(attempt)

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        token = _create_key.set(uuid.uuid4().hex)
        try:
            return self.patience.call(self._create_new_trial_once, study_id, template_trial)
        finally:
            _create_key.reset(token)

    def _create_new_trial_once(self, study_id: int, template_trial: FrozenTrial | None) -> FrozenTrial:
        if not self._creations_table_ready:
            self._create_creations_table()
        return super()._create_new_trial(study_id, template_trial)

    _creations_table_ready = False

    def _create_creations_table(self) -> None:
        try:
            CREATIONS.create(self.engine, checkfirst=True)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            # Another worker's first trial created it a moment ago: a unique-key violation in
            # PostgreSQL's catalog, or "already exists". An outage goes to the caller's patience.
            if is_outage(exc) or not (isinstance(exc, sqlalchemy.exc.IntegrityError) or "already exists" in str(exc)):
                raise
        self._creations_table_ready = True

    def _get_prepared_new_trial(self, study_id: int, template_trial: FrozenTrial | None, session) -> models.TrialModel:
        # Called inside the transaction that holds the study's row lock, by every attempt (Optuna
        # also repeats a failed creation itself): a row with this call's key means an earlier
        # attempt landed.
        key = _create_key.get()
        if key is not None:
            landed = session.execute(sqlalchemy.select(CREATIONS.c.trial_id)
                                     .where(CREATIONS.c.create_key == key)).scalar_one_or_none()
            trial = session.get(models.TrialModel, landed) if landed is not None else None
            if trial is not None and trial.study_id == study_id:
                return trial
        trial = super()._get_prepared_new_trial(study_id, template_trial, session)
        if key is not None:
            session.execute(CREATIONS.insert().values(create_key=key, trial_id=trial.trial_id))
        return trial


def lost_to_a_peer(exc: BaseException) -> bool:
    """Whether a trial could not be stored because the storage holds it as finished already: while
    this worker's heartbeat could not reach the storage, a peer failed the trial as stale and
    queued its retry. Optuna says so from a write during the trial (UpdateFinishedTrialError) or
    from the final tell (ValueError "Cannot tell a FAIL trial."), which its trial loop then turns
    into an AssertionError ("Should not reach.") raised while handling it."""
    if isinstance(exc, AssertionError):
        exc = exc.__context__
    return (isinstance(exc, optuna.exceptions.UpdateFinishedTrialError)
            or isinstance(exc, ValueError) and str(exc).startswith("Cannot tell a "))
