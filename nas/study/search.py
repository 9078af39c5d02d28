"""One process's share of a search: trials until the study holds the target, with the study's bar
above the epoch bars, or several spawned processes' shares under one bar; and the lines that sum a
study up at the end."""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from nas import data
from nas.cpu import tune_allocator
from nas.run.device import resolve_device
from nas.storage import artifact_dir_for, open_storage
from nas.storage.outage import lost_to_a_peer
from nas.study.objective import Objective, SearchOptions
from nas.study.progress import ProgressBar, TrialProgress
from nas.study.sampling import make_pruner, make_sampler
from nas.study.trials import (COST_UNITS, cost_objective, counts, finished_trials, is_multi_objective,
                              results_table, trial_counts)
from nas.studyfile import StudyConfig
from nas.workers import Line, Outbox, Slots, run_processes, when_leaving

ASK_WAIT = 10  # seconds a leaving worker waits for the trial it is creating (run_trials)


def artifact_dir(options: SearchOptions) -> Path:
    return Path(options.artifact_dir) if options.artifact_dir else artifact_dir_for(options.storage)


def load_split(options: SearchOptions, config: StudyConfig, device: torch.device) -> data.Split:
    """The search's split: the study's data, training on its training part, scored on validation."""
    return data.open_data(config.data, Path(options.data_dir)).split("valid", options.subset, device)


def quiet_optuna() -> None:
    # Optuna logs an interrupted trial as a warning with a traceback; the end-of-run summary
    # counts failed and interrupted trials instead.
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def run_search(options: SearchOptions, config: StudyConfig, workers: int, study: optuna.Study,
               split: data.Split | None = None) -> list[str]:
    """Trials until `study` holds options.trials: in this process, or in `workers` spawned ones
    sharing a count of the trials left to start (Slots), so that exactly options.trials finish.
    Spawned workers send their lines and each trial's steps here, where they are written above the
    study's bar (a line for each epoch too, unless quiet) and shown in its postfix. Returns a line
    for each worker that failed."""
    slots = Slots(options.trials - len(finished_trials(study)), shared=workers > 1)
    if workers == 1:
        run_worker(options, config, split, slots=slots)
        return []
    bar = ProgressBar(study, options.trials, disable=options.quiet, workers=workers)

    def relay(item: object) -> None:
        if isinstance(item, Line):
            bar.write(item.text, item.err)
        elif isinstance(item, TrialProgress):
            bar.progress(item)
            if item.phase == "train" and item.epoch and not options.quiet:
                bar.write(item.line())

    try:
        return run_processes(functools.partial(_worker_entry, options, config, slots), workers,
                             watch=lambda: bar.update(study), relay=relay)
    finally:
        bar.close()


def run_worker(options: SearchOptions, config: StudyConfig, split: data.Split | None = None, *,
               slots: Slots | None = None, outbox: Outbox | None = None) -> None:
    """One process's share of the search: trials until the study holds options.trials, each one
    started only with a slot claimed from `slots` (default: a count of this process's own). In a
    spawned worker, `outbox` takes its trials' steps (TrialProgress) to the parent's bar; alone,
    this process draws the study's bar above the epoch bars itself."""
    tune_allocator()
    if options.run.threads:
        torch.set_num_threads(options.run.threads)
    device = resolve_device(options.run.device)
    if split is None:
        split = load_split(options, config, device)
    storage = open_storage(options.storage, wait=True)  # its command has just reached it
    study = optuna.load_study(storage=storage, study_name=options.study,
                              sampler=make_sampler(options.seed),
                              pruner=make_pruner(config, options.epochs))
    if len(finished_trials(study)) >= options.trials:
        return
    if "config" in study.user_attrs:  # a study counts device costs as it was made to (nas.costmodel)
        config = dataclasses.replace(config, cost_model=StudyConfig.from_stored(study.user_attrs["config"]).cost_model)
    if slots is None:
        slots = Slots(options.trials - len(finished_trials(study)))
    objective = Objective(config, options, split, device, artifact_dir(options))
    bar, progress = None, None
    if outbox is not None:
        objective.bars = False
        progress = objective.progress = outbox.send
    elif not options.quiet:
        bar = ProgressBar(study, options.trials, disable=False)
        objective.nested = True
        progress = objective.progress = bar.progress
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    try:
        run_trials(study, objective, slots, target=options.trials, deadline=deadline, callbacks=[bar] if bar else None,
                   worker=options.worker, between=progress)
    finally:
        if bar:
            bar.close()


def run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], Any], slots: Slots, *, target: int,
               deadline: float | None = None, callbacks: list | None = None, worker: int = 0,
               between: Callable[[TrialProgress], None] | None = None) -> None:
    """Trials of `objective`, one at a time, until the study holds `target` counted trials, no
    slot is left or the `deadline` (monotonic seconds) has passed. Each needs a slot claimed first;
    a trial that does not count (rejected, failed, lost to a peer) gives it back. `between` hears
    that `worker` is between trials. An interrupted trial is failed; so is the trial under way when
    a spawned worker's parent dies or terminates it (nas.workers.when_leaving)."""
    ended: list[FrozenTrial] = []
    callbacks = [lambda study, trial: ended.append(trial), *(callbacks or [])]
    started: list[int] = []  # the trial ids this process asked for
    asking = threading.Lock()  # held while a trial is created and sampled, before its id is known
    ask = study.ask

    def ask_and_track(*args: Any, **kwargs: Any) -> optuna.Trial:
        # Optuna's optimize asks through the study: the trial is RUNNING in the storage from
        # the moment ask creates it, before the sampler has proposed anything.
        with asking:
            trial = ask(*args, **kwargs)
            started.append(trial._trial_id)
        return trial

    def leaving() -> None:
        # A trial being created when the parent died is failed too: wait for its id, though
        # not through an outage (a creation that waits on the storage has not landed), and keep
        # the lock, so that no trial is asked for after this one.
        asking.acquire(timeout=ASK_WAIT)
        if started:
            fail_if_running(study, started[-1])

    study.ask = ask_and_track
    when_leaving(leaving)

    while len(finished_trials(study)) < target and (deadline is None or time.monotonic() < deadline):
        if not slots.claim():
            return
        ended.clear()
        try:
            study.optimize(objective, n_trials=1, callbacks=callbacks, catch=(), gc_after_trial=False)
        except KeyboardInterrupt:
            if started:
                fail_if_running(study, started[-1])
            raise
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, AssertionError) as exc:
            if not lost_to_a_peer(exc):
                raise
            print(f"worker {worker}: a peer failed this worker's trial as stale while the storage "
                  "was unreachable, and queued its retry; this result is dropped", file=sys.stderr, flush=True)
        finally:
            if not (ended and counts(ended[-1])):
                slots.release()
            if between is not None:
                between(TrialProgress(worker, None))


def fail_if_running(study: optuna.Study, trial_id: int) -> None:
    """Fails a trial that is still running in the storage, as Optuna fails an interrupted one: a
    trial abandoned because its worker's parent died or terminated it, or one whose interruption
    came in the middle of a storage call, which Optuna does not fail (the heartbeat would, much
    later, as stale)."""
    storage = study._storage
    if storage.get_trial(trial_id).state == TrialState.RUNNING:
        try:
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # Optuna's own fail came first after all


def _worker_entry(options: SearchOptions, config: StudyConfig, slots: Slots, worker: int, threads: int,
                  outbox: Outbox) -> None:
    """One spawned worker process (run_search)."""
    # tqdm's default lock is a multiprocessing semaphore that no one releases at exit, and the
    # resource tracker then warns of a leak; bars in one process need only a thread lock.
    tqdm.set_lock(threading.RLock())
    quiet_optuna()
    run = dataclasses.replace(options.run, threads=options.run.threads or threads)
    try:
        run_worker(dataclasses.replace(options, worker=worker, run=run), config, slots=slots, outbox=outbox)
    except KeyboardInterrupt:
        sys.exit(130)


# --- reporting ----------------------------------------------------------------------------------


def summary_lines(study: optuna.Study, storage_url: str) -> list[str]:
    counts = trial_counts(study)
    lines = [f"Study {study.study_name!r}: " + ", ".join(f"{v} {k}" for k, v in counts.items()), ""]
    replay = f"python -m nas.replay --storage {storage_url} --study {study.study_name}"
    if is_multi_objective(study):
        lines += [f"Pareto front (validation accuracy up, {COST_UNITS[cost_objective(study)].removeprefix('B ')} "
                  "down), most accurate first:", ""]
    lines += [results_table(study), ""]
    dashboard = f"optuna-dashboard {storage_url}"
    dashboard += f" --artifact-dir {artifact_dir_for(storage_url)}"
    lines.append(f"Browse it:  {dashboard}")
    if is_multi_objective(study):
        lines.append(f"Replay a trial of the front:  {replay} --trial N   (no --trial: its most accurate)")
    else:
        lines.append(f"Replay the best trial:  {replay}")
        confirm = f"python -m nas.confirm --storage {storage_url} --study {study.study_name}"
        against = " against Model 3" if any(t.user_attrs.get("preset") == "model3"
                                             for t in study.get_trials(deepcopy=False)) else ""
        lines.append(f"Confirm the top 3{against} over 3 seeds:  {confirm}")
    return lines
