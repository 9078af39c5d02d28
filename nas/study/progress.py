"""A search's progress: the bar over the study's finished trials, and the callback that stops the
study at its target count."""

from __future__ import annotations

import sys
import threading

import optuna
from optuna.trial import FrozenTrial
from tqdm import tqdm

from nas.study.trials import best_trial, finished_trials, is_rejected


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
