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
- a new trial: each is created with a key (system attribute CREATE_KEY), and a repeat that finds
  the key in the study returns that trial, so a lost answer never leaves a second, ownerless
  RUNNING trial (one without a heartbeat is failed only after the grace period, as an orphan:
  PatientStorage._stale_or_orphaned);
- a new study: a repeat finds the name taken and loads the study instead.
Deleting a study is not repeated.
"""

from __future__ import annotations

import copy
import functools
import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.storages._rdb import models  # the trial tables, to find a creation that landed
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

OUTAGE_SECONDS = 60  # how long a worker waits for its database before giving up
FIRST_DELAY, MAX_DELAY = 0.5, 5.0  # seconds between attempts: doubling from the first, capped
CREATE_KEY = "nas_create_key"


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


def _patient(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self: PatientStorage, *args: Any, **kwargs: Any) -> Any:
        return self.patience.call(method, self, *args, **kwargs)

    return call


class PatientStorage(RDBStorage):
    """RDBStorage whose calls wait out an outage (`patience`)."""

    def __init__(self, url: str, patience: Patience, **kwargs: Any):
        self.patience = patience
        super().__init__(url, **kwargs)

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
        template = copy.deepcopy(template_trial) if template_trial else FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
            datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
            intermediate_values={}, trial_id=-1)
        template.system_attrs[CREATE_KEY] = uuid.uuid4().hex
        return self.patience.call(super()._create_new_trial, study_id, template)

    def _get_prepared_new_trial(self, study_id: int, template_trial: FrozenTrial | None, session) -> models.TrialModel:
        # Called inside the transaction that holds the study's row lock, by every attempt (Optuna
        # also repeats a failed creation itself): a trial with this key means an earlier one landed.
        key = template_trial.system_attrs.get(CREATE_KEY) if template_trial else None
        if key is not None:
            landed = (session.query(models.TrialModel).join(models.TrialSystemAttributeModel)
                      .filter(models.TrialModel.study_id == study_id,
                              models.TrialSystemAttributeModel.key == CREATE_KEY,
                              models.TrialSystemAttributeModel.value_json == json.dumps(key))
                      .one_or_none())
            if landed is not None:
                return landed
        return super()._get_prepared_new_trial(study_id, template_trial, session)


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
