"""A search's progress: the bar over the study's finished trials with an ETA that knows the rung,
and the callback that stops the study at its target count."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from statistics import fmean

import optuna
from optuna.trial import FrozenTrial
from tqdm import tqdm

from nas.study.trials import best_trial, finished_trials, is_rejected, stopped_at_rung

PRIOR_TRIALS = 3  # how many trials the expected share of full trainings weighs, against this run's own
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"  # tqdm's, less its uniform-rate ETA


class StopAtTarget:
    """Stops the study once it holds `target` finished trials (every worker checks after each trial)."""

    def __init__(self, target: int):
        self.target = target

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if len(finished_trials(study)) >= self.target:
            study.stop()


@dataclass(frozen=True)
class Finished:
    """A finished trial, as the ETA sees it."""

    seconds: float  # wall time, start to end
    at_rung: bool  # stopped at the rung; otherwise it went on to full training (or ran no rung)
    rung_seconds: float | None = None  # one that went on: its time outside full training (None: no rung)
    preset: bool = False  # enqueued presets run first and go on, so they tell nothing of the share
    earlier: bool = False  # finished in an earlier run of the study


def finished_times(trials: list[FrozenTrial], since: datetime) -> list[Finished]:
    """`trials` (finished, counting toward --trials: rejected ones take no time) with their wall
    times, those started before `since` marked earlier."""
    return [Finished(seconds=(t.datetime_complete - t.datetime_start).total_seconds(),
                     at_rung=stopped_at_rung(t), rung_seconds=_rung_seconds(t),
                     preset="preset" in t.user_attrs, earlier=t.datetime_start < since)
            for t in trials]


def _rung_seconds(trial: FrozenTrial) -> float | None:
    if stopped_at_rung(trial) or "rung_acc" not in trial.user_attrs or "train_seconds" not in trial.user_attrs:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds() - trial.user_attrs["train_seconds"]


def expected_seconds(finished: list[Finished], remaining: int, full_share: float, workers: int = 1) -> float | None:
    """The expected wall time of `remaining` trials on `workers` workers: remaining x (share of rung
    stops x mean rung stop + share of full trainings x mean full trial) / workers.

    Durations are this run's; a kind this run has not finished yet takes the earlier runs' mean, and
    a rung stop with none at all the time full trials spent outside full training (their rung).
    The share of full trainings is this run's among the candidates the rung screened (presets
    aside), starting from `full_share` (the rung's keep), which weighs as PRIOR_TRIALS trials. If no
    trial ran the rung (another pruner, or a rung that does not pay), every trial is a full one.
    None until a full trial has finished."""
    if remaining <= 0:
        return 0.0

    def mean_of(kind: list[Finished]) -> float | None:
        own = [f.seconds for f in kind if not f.earlier]
        seconds = own or [f.seconds for f in kind]
        return fmean(seconds) if seconds else None

    full = mean_of([f for f in finished if not f.at_rung])
    if full is None:
        return None
    rungs = [f.rung_seconds for f in finished if f.rung_seconds is not None]
    if not rungs and not any(f.at_rung for f in finished):
        return remaining * full / workers
    stop = mean_of([f for f in finished if f.at_rung])
    if stop is None:
        stop = fmean(rungs)
    screened = [f for f in finished if not f.earlier and not f.preset]
    share = (sum(not f.at_rung for f in screened) + full_share * PRIOR_TRIALS) / (len(screened) + PRIOR_TRIALS)
    return remaining * (share * full + (1 - share) * stop) / workers


class ProgressBar:
    """A bar over the study's finished trials: finished / target, elapsed time, the ETA
    (expected_seconds over this run's finished trials, counting down between them; `full_share` and
    `workers` as there), the rejected count and the best value so far. It stays on the top line
    while trials train beneath it, and its clock ticks every second."""

    def __init__(self, study: optuna.Study, target: int, disable: bool, full_share: float = 1.0, workers: int = 1):
        self.since = datetime.now()  # Optuna's trial times are naive local times too
        self.full_share, self.workers = full_share, workers
        self.lock = threading.Lock()
        self.postfix: dict[str, object] = {}
        self.eta: float | None = None
        self.counted = -1  # finished trials when the ETA was last estimated
        self.estimated_at = time.monotonic()
        done = min(len(finished_trials(study)), target)
        self.bar = tqdm(total=target, initial=done, desc="Trials", unit="trial", disable=disable, file=sys.stdout,
                        position=0, dynamic_ncols=True, bar_format=BAR_FORMAT)
        self.update(study)
        self.stopped = threading.Event()
        self.ticker = threading.Thread(target=self.tick, daemon=True)
        if not disable:
            self.ticker.start()

    def tick(self) -> None:
        while not self.stopped.wait(1.0):
            self.draw()

    def update(self, study: optuna.Study, trial: FrozenTrial | None = None) -> None:
        finished = finished_trials(study)
        best = best_trial(study)
        rejected = sum(1 for t in study.get_trials(deepcopy=False) if is_rejected(t))
        eta = expected_seconds(finished_times(finished, self.since), self.bar.total - len(finished),
                               self.full_share, self.workers)
        with self.lock:
            if len(finished) != self.counted or self.eta is None:  # a watcher polls between trials:
                self.eta, self.estimated_at = eta, time.monotonic()  # keep counting down until one ends
            self.counted = len(finished)
            self.bar.n = min(len(finished), self.bar.total)
            self.postfix = {"rejected": rejected}
            if best is not None:
                self.postfix["best"] = f"{best.values[0]:.2f}% (#{best.number})"
        self.draw()

    __call__ = update

    def draw(self) -> None:
        with self.lock:
            left = "?" if self.eta is None else tqdm.format_interval(
                max(0.0, self.eta - (time.monotonic() - self.estimated_at)))
            self.bar.set_postfix({"eta": left, **self.postfix}, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        self.stopped.set()
        if self.ticker.is_alive():
            self.ticker.join()
        self.bar.close()
