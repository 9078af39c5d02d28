"""Worker processes that share one study: spawning them with the CPUs split between them, the
progress bar over the study's finished trials, and the callback that stops at the target count."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable

import optuna
import torch
from optuna.trial import FrozenTrial
from tqdm import tqdm

from nas.cli import positive_int
from nas.trials import best_trial, finished_trials, is_rejected


class StopAtTarget:
    """Stops the study once it holds `target` finished trials (every worker checks after each trial)."""

    def __init__(self, target: int):
        self.target = target

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if len(finished_trials(study)) >= self.target:
            study.stop()


class ProgressBar:
    """A bar over the study's finished trials: finished / target, the best value so far, elapsed
    time and the ETA at this run's rate (trials finished before it started don't count toward the
    rate). It stays on the top line while trials train beneath it, and its clock ticks every second."""

    def __init__(self, study: optuna.Study, target: int, disable: bool):
        done = min(len(finished_trials(study)), target)
        self.bar = tqdm(total=target, initial=done, desc="Trials", unit="trial", disable=disable, file=sys.stdout,
                        position=0, dynamic_ncols=True)
        self.update(study)
        self.stopped = threading.Event()
        self.ticker = threading.Thread(target=self.tick, daemon=True)
        if not disable:
            self.ticker.start()

    def tick(self) -> None:
        while not self.stopped.wait(1.0):
            self.bar.refresh()

    def update(self, study: optuna.Study, trial: FrozenTrial | None = None) -> None:
        done = len(finished_trials(study))
        self.bar.n = min(done, self.bar.total)
        best = best_trial(study)
        rejected = sum(1 for t in study.get_trials(deepcopy=False) if is_rejected(t))
        postfix = {"rejected": rejected}
        if best is not None:
            postfix["best"] = f"{best.values[0]:.2f}% (#{best.number})"
        self.bar.set_postfix(postfix)
        self.bar.refresh()

    __call__ = update

    def close(self) -> None:
        self.stopped.set()
        if self.ticker.is_alive():
            self.ticker.join()
        self.bar.close()


def run_workers(target: Callable[[int, int], None], workers: int, study: optuna.Study, trials: int,
                quiet: bool) -> int:
    """Runs target(worker, threads) in `workers` spawned processes, the CPUs split evenly between
    them; they share the study through its storage, and this process only watches and draws the bar
    up to `trials` finished trials. Returns 0, or 1 after one line naming each worker that failed.
    `target` must be importable by name (a module-level function): spawn pickles it."""
    context = multiprocessing.get_context("spawn")
    threads = max(1, available_cpus() // workers)
    procs = [context.Process(target=target, args=(i, threads)) for i in range(workers)]
    for p in procs:
        p.start()
    bar = ProgressBar(study, trials, disable=quiet)
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(2)
            bar.update(study)
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
        raise
    finally:
        bar.update(study)
        bar.close()
    failed = [f"worker {i} was killed by signal {-p.exitcode}" if p.exitcode < 0
              else f"worker {i} exited with status {p.exitcode}" for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        print(f"error: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def workers_arg(text: str) -> int | str:
    return "auto" if text == "auto" else positive_int(text)


def resolve_workers(workers: int | str, device: torch.device) -> int:
    if workers != "auto":
        return workers
    return available_cpus() if device.type == "cpu" else 1


def available_cpus() -> int:
    """CPUs this process may run on: a taskset's or cpuset's share, not the whole machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
