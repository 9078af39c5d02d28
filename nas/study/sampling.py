"""The sampler and the pruner a study runs with: Optuna's TPE, seeded per trial, and the rung
pruner, which screens every candidate with a short run before full training."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from nas.study.levers import keep_share, stops_on_the_curve
from nas.studyfile import RungConfig, StudyConfig

RUNG_STEP = 0  # the rung's score is the trial's intermediate value at step 0; epochs are steps 1..N
TPE_STARTUP = 10  # TPE's first trials are random draws (n_startup_trials)


def make_pruner(config: StudyConfig, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner the study file names (nas.studyfile.check has refused any name not in PRUNERS),
    for trials of `epochs` epochs."""
    return PRUNERS[config.pruner](config, epochs)


def rung_pays(config: StudyConfig, epochs: int, train_images: int) -> bool:
    """Whether the study's rung is cheaper than the full training it screens for (it is not in a
    quick look such as --epochs 1 --subset 256): where it is not, trials skip it and train in full."""
    rung = config.rung
    return rung.epochs * min(rung.subset, train_images) < epochs * train_images


def goes_on(score: float, others: list[float], keep: float, startup: int, margin: float) -> bool:
    """Whether a candidate with rung score `score` trains in full, given the rung scores `others` of
    the study's other trials: it must score at least the best of them less `margin` (percentage
    points), and, once there are `startup` of them, be beaten by fewer than the `keep` share of all
    rung scores (its own included). The first candidate always goes on."""
    if others and score < max(others) - margin:
        return False
    return len(others) < startup or sum(s > score for s in others) < keep * (len(others) + 1)


PRESET_POLL_SECONDS = 1.0


def preset_at_rung(trial: FrozenTrial) -> bool:
    """An enqueued preset that is running and has no rung score yet."""
    return (trial.state == optuna.trial.TrialState.RUNNING and "preset" in trial.user_attrs
            and RUNG_STEP not in trial.intermediate_values and "rejected" not in trial.user_attrs)


class RungPruner(optuna.pruners.BasePruner):
    """Prunes at the cheap first rung (step RUNG_STEP) a trial that does not go on (goes_on) against
    the rung scores of every other trial that ran the rung, whatever became of it (completed,
    pruned there, still training, carried over by a warm start); the enqueued presets run first, so
    they set the bar from the second trial on. During full training it prunes only by the curve lever
    (nas.study.levers, off by default); its keep share tightens by the crowd lever. Optuna's own
    pruners don't fit a rung that is a separate, cheaper run: Median and Percentile compare against
    completed trials only, so the bar would rise with each promotion, and successive halving's rungs
    sit at steps >= 1 of the same run."""

    def __init__(self, keep: float, startup: int, margin: float, patience: float = 900.0,
                 levers: RungConfig | None = None):
        self.keep, self.startup, self.margin = keep, startup, margin
        self.patience = patience  # seconds a verdict waits at most for a running preset's rung score
        self.levers = levers or RungConfig()  # its crowd_* and curve_* keys (nas.study.levers); default: off

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if trial.last_step != RUNG_STEP:
            return stops_on_the_curve(study, trial, self.levers)
        waited = 0.0
        while True:
            trials = study.get_trials(deepcopy=False)
            others = [t.intermediate_values[RUNG_STEP] for t in sorted(trials, key=lambda t: t.number)
                      if t.number != trial.number and RUNG_STEP in t.intermediate_values]
            # With several workers a candidate can reach the rung before the preset that sets the bar
            # (Model 3, trial 0, started at the same moment) has: its verdict waits for the preset's score.
            if others or waited >= self.patience or not any(preset_at_rung(t) for t in trials):
                break
            time.sleep(PRESET_POLL_SECONDS)
            waited += PRESET_POLL_SECONDS
        keep = keep_share(others, self.keep, self.levers)
        return not goes_on(trial.intermediate_values[RUNG_STEP], others, keep, self.startup, self.margin)


# Each study-file pruner name and how to make it from the study's config and its epochs per trial.
PRUNERS: dict[str, Callable[[StudyConfig, int], optuna.pruners.BasePruner]] = {
    "median": lambda config, epochs: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
    "hyperband": lambda config, epochs: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs,
                                                                        reduction_factor=3),
    "rung": lambda config, epochs: RungPruner(config.rung.keep, config.rung.startup, config.rung.margin,
                                              levers=config.rung),
    "none": lambda config, epochs: optuna.pruners.NopPruner(),
}


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler, its random draws seeded by (seed, trial number).

    Every process that joins a study (a scaled compose worker, a worker on another machine, a rerun
    that resumes) starts its own sampler. Seeded once per process they would all draw the same
    candidates in the same order, and the random startup trials would repeat across processes.
    Trial numbers are unique within a study, so each trial gets its own draws, and the same study
    history gives the same ones."""

    def __init__(self, seed: int, **tpe_options: Any):
        self.seed, self.tpe_options = seed, tpe_options
        self.number: int | None = None  # the trial self.tpe was made for
        self.tpe: optuna.samplers.TPESampler | None = None

    def for_trial(self, number: int) -> optuna.samplers.TPESampler:
        if self.tpe is None or number != self.number:
            seed = (self.seed * 1_000_003 + number) % 2**32
            with warnings.catch_warnings():
                # multivariate, group and constant_liar are marked experimental; they are chosen.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.tpe = optuna.samplers.TPESampler(seed=seed, **self.tpe_options)
            self.number = number
        return self.tpe

    def infer_relative_search_space(self, study, trial):
        return self.for_trial(trial.number).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.for_trial(trial.number).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.for_trial(trial.number).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.for_trial(trial.number).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.for_trial(trial.number).after_trial(study, trial, state, values)


def make_sampler(seed: int) -> optuna.samplers.BaseSampler:
    # constant_liar keeps parallel workers from sampling the same point while trials run.
    return TrialSeededSampler(seed, multivariate=True, group=True, constant_liar=True,
                              n_startup_trials=TPE_STARTUP)
